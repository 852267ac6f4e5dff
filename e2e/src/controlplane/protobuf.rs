//! Just enough of the Kubernetes protobuf encoding to accept what `kubectl create secret|configmap|
//! namespace|serviceaccount` sends (kubectl's typed clients post protobuf for built-in kinds). Other
//! kinds in protobuf get 415 with a hint to use `kubectl apply`.

use base64::Engine as _;
use serde_json::{Map, Value, json};

/// The magic prefix of Kubernetes protobuf bodies.
const MAGIC: &[u8] = b"k8s\x00";

struct Reader<'a> {
    buf: &'a [u8],
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (b, rest) = self.buf.split_first()?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn next(&mut self) -> Option<Result<(u64, Field<'a>), String>> {
        if self.buf.is_empty() {
            return None;
        }
        Some(self.field())
    }

    fn field(&mut self) -> Result<(u64, Field<'a>), String> {
        let key = self.varint().ok_or("truncated key")?;
        let (number, wire) = (key >> 3, key & 7);
        match wire {
            0 => Ok((
                number,
                Field::Varint(self.varint().ok_or("truncated varint")?),
            )),
            2 => {
                let len = usize::try_from(self.varint().ok_or("truncated length")?)
                    .map_err(|_| "length overflow")?;
                if len > self.buf.len() {
                    return Err("truncated field".into());
                }
                let (data, rest) = self.buf.split_at(len);
                self.buf = rest;
                Ok((number, Field::Bytes(data)))
            }
            1 => {
                self.buf = self.buf.get(8..).ok_or("truncated fixed64")?;
                Ok((number, Field::Varint(0)))
            }
            5 => {
                self.buf = self.buf.get(4..).ok_or("truncated fixed32")?;
                Ok((number, Field::Varint(0)))
            }
            w => Err(format!("unsupported wire type {w}")),
        }
    }
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut r = Reader { buf };
    let mut out = Vec::new();
    while let Some(f) = r.next() {
        out.push(f?);
    }
    Ok(out)
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
}

/// A `map<string, string|bytes>` entry.
fn entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), String> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(k)) => key = text(k)?,
            (2, Field::Bytes(v)) if bytes_value => {
                value = json!(base64::engine::general_purpose::STANDARD.encode(v))
            }
            (2, Field::Bytes(v)) => value = json!(text(v)?),
            _ => {}
        }
    }
    Ok((key, value))
}

fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    let mut labels = Map::new();
    let mut annotations = Map::new();
    let mut finalizers = Vec::new();
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(v)) => drop(m.insert("name".into(), json!(text(v)?))),
            (2, Field::Bytes(v)) => drop(m.insert("generateName".into(), json!(text(v)?))),
            (3, Field::Bytes(v)) => drop(m.insert("namespace".into(), json!(text(v)?))),
            (6, Field::Bytes(v)) => drop(m.insert("resourceVersion".into(), json!(text(v)?))),
            (11, Field::Bytes(v)) => {
                let (k, v) = entry(v, false)?;
                labels.insert(k, v);
            }
            (12, Field::Bytes(v)) => {
                let (k, v) = entry(v, false)?;
                annotations.insert(k, v);
            }
            (14, Field::Bytes(v)) => finalizers.push(json!(text(v)?)),
            _ => {}
        }
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if !annotations.is_empty() {
        m.insert("annotations".into(), Value::Object(annotations));
    }
    if !finalizers.is_empty() {
        m.insert("finalizers".into(), Value::Array(finalizers));
    }
    Ok(Value::Object(m))
}

/// Decodes a protobuf request body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let unknown = body
        .strip_prefix(MAGIC)
        .ok_or("not a Kubernetes protobuf body (missing the k8s\\0 prefix)")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(unknown)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (n, f) in fields(tm)? {
                    match (n, f) {
                        (1, Field::Bytes(v)) => api_version = text(v)?,
                        (2, Field::Bytes(v)) => kind = text(v)?,
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(r)) => raw = r,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    let mut data = Map::new();
    let mut other = Map::new();
    for (n, f) in fields(raw)? {
        match (api_version.as_str(), kind.as_str(), n, f) {
            (_, _, 1, Field::Bytes(m)) => drop(obj.insert("metadata".into(), object_meta(m)?)),
            ("v1", "Secret", 2, Field::Bytes(e)) => {
                let (k, v) = entry(e, true)?;
                data.insert(k, v);
            }
            ("v1", "Secret", 3, Field::Bytes(t)) => {
                drop(obj.insert("type".into(), json!(text(t)?)))
            }
            ("v1", "Secret", 4, Field::Bytes(e)) => {
                let (k, v) = entry(e, false)?;
                other.insert(k, v);
            }
            ("v1", "ConfigMap", 2, Field::Bytes(e)) => {
                let (k, v) = entry(e, false)?;
                data.insert(k, v);
            }
            ("v1", "ConfigMap", 3, Field::Bytes(e)) => {
                let (k, v) = entry(e, true)?;
                other.insert(k, v);
            }
            ("v1", "Secret" | "ConfigMap", 5 | 4, Field::Varint(b)) => {
                drop(obj.insert("immutable".into(), json!(b != 0)))
            }
            ("v1", "Namespace" | "ServiceAccount", _, _) => {}
            (_, _, n, _) if n > 1 => {
                return Err(format!(
                    "{api_version} {kind} in protobuf is not understood by the local API server; send JSON (e.g. kubectl apply -f)"
                ));
            }
            _ => {}
        }
    }
    if !data.is_empty() {
        obj.insert("data".into(), Value::Object(data));
    }
    if !other.is_empty() {
        let field = if kind == "Secret" {
            "stringData"
        } else {
            "binaryData"
        };
        obj.insert(field.into(), Value::Object(other));
    }
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Secret" | "ConfigMap" | "Namespace" | "ServiceAccount") => Ok(Value::Object(obj)),
        _ => Err(format!(
            "{api_version} {kind} in protobuf is not understood by the local API server; send JSON (e.g. kubectl apply -f)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, data: &[u8]) -> Vec<u8> {
        let mut out = vec![((n << 3) | 2) as u8, data.len() as u8];
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn decodes_a_kubectl_create_secret_body() {
        let meta = [
            field(1, b"pg-creds"),
            field(3, b"default"),
            field(11, &[field(1, b"a"), field(2, b"b")].concat()),
        ]
        .concat();
        let secret = [
            field(1, &meta),
            field(2, &[field(1, b"password"), field(2, b"s3cret")].concat()),
            field(3, b"Opaque"),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &secret)].concat();
        let obj = decode(&body).unwrap();
        assert_eq!(obj["metadata"]["name"], "pg-creds");
        assert_eq!(obj["metadata"]["labels"]["a"], "b");
        assert_eq!(
            obj["data"]["password"],
            base64::engine::general_purpose::STANDARD.encode("s3cret")
        );
        assert_eq!(obj["type"], "Opaque");
    }
}
