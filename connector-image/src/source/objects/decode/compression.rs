//! Whole-file compression: gzip (concatenated members too), zstd (several frames too) and snappy's
//! framing format, chosen by the spec, else by the key's extension, else by the first bytes.

use std::io::{BufRead, Chain, Cursor, Read};

use obsrv_crds::ObjectCompression;
use serde::{Deserialize, Serialize};

/// The codec of one object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Codec {
    None,
    Gzip,
    Zstd,
    Snappy,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const SNAPPY_MAGIC: &[u8] = b"\xff\x06\x00\x00sNaPpY";

impl Codec {
    /// The codec the spec or the key names; `None` when only the content can tell (`auto` and an
    /// extension that names no codec).
    pub fn named(spec: ObjectCompression, key: &str) -> Option<Codec> {
        match spec {
            ObjectCompression::None => Some(Codec::None),
            ObjectCompression::Gzip => Some(Codec::Gzip),
            ObjectCompression::Zstd => Some(Codec::Zstd),
            ObjectCompression::Snappy => Some(Codec::Snappy),
            ObjectCompression::Auto => {
                let ext = key.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
                match ext.as_deref() {
                    Some("gz" | "gzip") => Some(Codec::Gzip),
                    Some("zst" | "zstd") => Some(Codec::Zstd),
                    Some("sz" | "snappy") => Some(Codec::Snappy),
                    _ => None,
                }
            }
        }
    }

    /// The codec the first bytes of an object show (uncompressed when none matches).
    pub fn sniff(head: &[u8]) -> Codec {
        if head.starts_with(GZIP_MAGIC) {
            Codec::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            Codec::Zstd
        } else if head.starts_with(SNAPPY_MAGIC) {
            Codec::Snappy
        } else {
            Codec::None
        }
    }

    /// The codec's name, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::None => "uncompressed",
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
            Codec::Snappy => "snappy",
        }
    }

    /// The decompressed bytes of `input`.
    pub fn reader<'a>(
        self,
        input: impl BufRead + Send + 'a,
    ) -> std::io::Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Codec::None => Box::new(input),
            Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
            Codec::Snappy => Box::new(snap::read::FrameDecoder::new(input)),
        })
    }
}

/// An input whose first bytes were read to tell its codec, put back in front of the rest.
pub type Sniffed<R> = Chain<Cursor<Vec<u8>>, R>;

/// Reads the first bytes of `input` to tell its codec; returns it with the whole input again.
pub fn sniff_reader<R: Read>(mut input: R) -> std::io::Result<(Codec, Sniffed<R>)> {
    let mut head = vec![0u8; SNAPPY_MAGIC.len()];
    let mut got = 0;
    while got < head.len() {
        match input.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(got);
    Ok((Codec::sniff(&head), Cursor::new(head).chain(input)))
}

/// `data` compressed with `codec` (test input).
#[cfg(test)]
pub(crate) fn compress(codec: Codec, data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match codec {
        Codec::None => data.to_vec(),
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Codec::Zstd => zstd::encode_all(data, 1).unwrap(),
        Codec::Snappy => {
            let mut e = snap::write::FrameEncoder::new(Vec::new());
            e.write_all(data).unwrap();
            e.into_inner().unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decompress(codec: Codec, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        codec.reader(data)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn codecs_are_named_by_spec_or_extension_and_told_by_content() {
        assert_eq!(
            Codec::named(ObjectCompression::Auto, "a/b.jsonl.GZ"),
            Some(Codec::Gzip)
        );
        assert_eq!(
            Codec::named(ObjectCompression::Auto, "x.csv.zst"),
            Some(Codec::Zstd)
        );
        assert_eq!(
            Codec::named(ObjectCompression::Auto, "x.sz"),
            Some(Codec::Snappy)
        );
        assert_eq!(Codec::named(ObjectCompression::Auto, "x.jsonl"), None);
        assert_eq!(
            Codec::named(ObjectCompression::None, "x.gz"),
            Some(Codec::None)
        );
        for c in [Codec::None, Codec::Gzip, Codec::Zstd, Codec::Snappy] {
            let body = compress(c, b"{\"a\":1}\n");
            let (sniffed, mut whole) = sniff_reader(body.as_slice()).unwrap();
            assert_eq!(sniffed, c);
            let mut again = Vec::new();
            whole.read_to_end(&mut again).unwrap();
            assert_eq!(again, body, "nothing consumed by sniffing");
            assert_eq!(decompress(c, &body).unwrap(), b"{\"a\":1}\n");
        }
    }

    #[test]
    fn concatenated_gzip_members_and_zstd_frames_read_through() {
        let mut gz = compress(Codec::Gzip, b"a\n");
        gz.extend(compress(Codec::Gzip, b"b\n"));
        assert_eq!(decompress(Codec::Gzip, &gz).unwrap(), b"a\nb\n");
        let mut zs = compress(Codec::Zstd, b"a\n");
        zs.extend(compress(Codec::Zstd, b"b\n"));
        assert_eq!(decompress(Codec::Zstd, &zs).unwrap(), b"a\nb\n");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_short_file() {
        let data: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("{{\"i\":{i}}}\n").into_bytes())
            .collect();
        for c in [Codec::Gzip, Codec::Zstd, Codec::Snappy] {
            let body = compress(c, &data);
            let cut = &body[..body.len() / 2];
            assert!(
                decompress(c, cut).is_err(),
                "{c:?} truncated read as a shorter file"
            );
        }
    }
}
