//! The `azureBlob` kind: blobs in an Azure Blob Storage container. Only the client is built here
//! (shared key, SAS token or connection string from the Secret, else the pod's identity); listing,
//! state, scale-out and decoding are the shared file-source layer's ([`super::objects`]).

use std::collections::BTreeMap;

use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use obsrv_crds::{AzureAuth, AzureBlobSourceSpec};

use super::{SourceFactory, objects};
use crate::config::Secrets;
use crate::error::{Error, Result};

/// What a connection string says: `Key=Value` pairs separated by `;` (values may hold `=`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConnectionString {
    pub account: Option<String>,
    pub account_key: Option<String>,
    pub sas: Option<String>,
    pub blob_endpoint: Option<String>,
    pub protocol: Option<String>,
    pub endpoint_suffix: Option<String>,
}

impl ConnectionString {
    /// Parses a connection string; the error names the part that is wrong, never a value.
    pub fn parse(s: &str) -> Result<ConnectionString> {
        let mut parts = BTreeMap::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                Error::Config("azureBlob connection string: a part is not Key=Value".into())
            })?;
            parts.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        let c = ConnectionString {
            account: parts.remove("accountname"),
            account_key: parts.remove("accountkey"),
            sas: parts.remove("sharedaccesssignature"),
            blob_endpoint: parts.remove("blobendpoint"),
            protocol: parts.remove("defaultendpointsprotocol"),
            endpoint_suffix: parts.remove("endpointsuffix"),
        };
        if c.account_key.is_none() && c.sas.is_none() {
            return Err(Error::Config(
                "azureBlob connection string has neither AccountKey nor SharedAccessSignature"
                    .into(),
            ));
        }
        Ok(c)
    }

    /// The blob service URL it names, if any (an explicit `BlobEndpoint`, or one built from the
    /// account, protocol and endpoint suffix).
    pub fn endpoint(&self) -> Option<String> {
        self.blob_endpoint.clone().or_else(|| {
            let account = self.account.as_ref()?;
            let suffix = self
                .endpoint_suffix
                .as_deref()
                .unwrap_or("core.windows.net");
            let proto = self.protocol.as_deref().unwrap_or("https");
            Some(format!("{proto}://{account}.blob.{suffix}"))
        })
    }
}

/// The container's client.
pub fn store(spec: &AzureBlobSourceSpec, secrets: &Secrets) -> Result<objects::Store> {
    let mut b = MicrosoftAzureBuilder::from_env().with_container_name(&spec.container);
    let mut account = spec.account.clone();
    let mut endpoint = spec.endpoint.clone();
    if let Some(c) = &spec.credentials {
        let value = secrets.get(c.env()).ok_or_else(|| {
            Error::Config(format!(
                "azureBlob credentials: Secret {} has no value for key {}",
                c.secret_name,
                c.secret_key()
            ))
        })?;
        match c.auth {
            AzureAuth::SharedKey => b = b.with_access_key(value),
            AzureAuth::SasToken => b = b.with_config(AzureConfigKey::SasKey, value),
            AzureAuth::ConnectionString => {
                let cs = ConnectionString::parse(value)?;
                account = account.or(cs.account.clone());
                if spec.endpoint.is_none() {
                    endpoint = cs.endpoint();
                }
                if let Some(k) = &cs.account_key {
                    b = b.with_access_key(k);
                } else if let Some(sas) = &cs.sas {
                    b = b.with_config(AzureConfigKey::SasKey, sas);
                }
            }
        }
    }
    let account = account.ok_or_else(|| {
        Error::Config("azureBlob: account is not set and no connection string names it".into())
    })?;
    b = b.with_account(&account);
    if let Some(ep) = &endpoint {
        b = b
            .with_endpoint(ep.trim_end_matches('/').to_string())
            .with_allow_http(ep.starts_with("http://"));
    }
    let url = format!("az://{account}/{}", spec.container);
    objects::Store::new("azureBlob", b.build(), url, &spec.container)
}

/// The `azureBlob` kind.
pub fn factory() -> SourceFactory {
    let kind = &obsrv_crds::source::object::AZURE_BLOB;
    objects::factory(kind, |s| s.azure_blob.as_ref(), |s| &s.objects, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_name_account_key_or_sas_and_endpoint() {
        let c = ConnectionString::parse(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5==;\
             BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;",
        )
        .unwrap();
        assert_eq!(c.account.as_deref(), Some("devstoreaccount1"));
        assert_eq!(
            c.account_key.as_deref(),
            Some("a2V5=="),
            "values keep their '='"
        );
        assert_eq!(
            c.endpoint().as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
        let sas = ConnectionString::parse(
            "AccountName=prod;SharedAccessSignature=sv=2022-11-02&sig=abc%3D;EndpointSuffix=core.chinacloudapi.cn",
        )
        .unwrap();
        assert_eq!(sas.sas.as_deref(), Some("sv=2022-11-02&sig=abc%3D"));
        assert_eq!(
            sas.endpoint().as_deref(),
            Some("https://prod.blob.core.chinacloudapi.cn")
        );
        let e = ConnectionString::parse("AccountName=x;secret").unwrap_err();
        assert!(
            !e.to_string().contains("secret"),
            "no value in messages: {e}"
        );
        assert!(ConnectionString::parse("AccountName=x").is_err());
    }
}
