//! AWS KMS for envelope encryption: each key version's 256-bit material is a KMS data key
//! (`GenerateDataKey`, AES_256) kept only wrapped (its `CiphertextBlob`) in the key file; at
//! start-up each version is unwrapped once (`Decrypt`) and held in memory, zeroized on drop.
//! The KMS key never leaves KMS; a stolen key file and database are useless without it.
//!
//! Requests are KMS's JSON protocol over HTTPS, signed with AWS Signature Version 4 by the
//! `aws-sigv4` crate; credentials come from the standard environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never from the
//! configuration file. Each wrapped key is bound to its version by the encryption context
//! (`fhirvault-key-version`), so a blob moved to another version fails to unwrap.

use super::{CryptoError, KeyMaterial};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use zeroize::Zeroizing;

fn err(msg: impl Into<String>) -> CryptoError {
    CryptoError::KeyStore(msg.into())
}

/// A KMS endpoint, region, key and the credentials to call it with.
#[derive(Clone)]
pub struct KmsClient {
    endpoint: String,
    region: String,
    key_id: String,
    credentials: Credentials,
}

impl std::fmt::Debug for KmsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never the credentials
        f.debug_struct("KmsClient")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl KmsClient {
    /// A client for `key_id` in `region`, at `endpoint` (default: the region's public KMS
    /// endpoint), with credentials from the environment. Plain `http://` is accepted only on a
    /// loopback address (a local KMS emulator).
    pub fn from_env(endpoint: Option<&str>, region: &str, key_id: &str) -> Result<KmsClient, CryptoError> {
        let endpoint = match endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!("https://kms.{region}.amazonaws.com"),
        };
        let loopback = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"]
            .iter()
            .any(|p| endpoint.starts_with(p));
        if !endpoint.starts_with("https://") && !loopback {
            return Err(err("the KMS endpoint must use https (plain http only on loopback)"));
        }
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (Some(access_key), Some(secret_key)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) else {
            return Err(err(
                "AWS credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if temporary)",
            ));
        };
        Ok(KmsClient {
            endpoint,
            region: region.to_string(),
            key_id: key_id.to_string(),
            credentials: Credentials::new(access_key, secret_key, var("AWS_SESSION_TOKEN"), None, "environment"),
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// One KMS API call (`target` as in `TrentService.<target>`), signed; the JSON answer.
    /// Errors name the operation, the HTTP status and KMS's error type, nothing more.
    pub fn call(&self, target: &str, body: &Value) -> Result<Value, CryptoError> {
        let body = serde_json::to_vec(body).map_err(|e| err(e.to_string()))?;
        let url = format!("{}/", self.endpoint);
        let amz_target = format!("TrentService.{target}");
        let headers = [
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", amz_target.as_str()),
        ];
        let identity = self.credentials.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("kms")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| err(format!("signing KMS {target}: {e}")))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().copied(),
            SignableBody::Bytes(&body),
        )
        .map_err(|e| err(format!("signing KMS {target}: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| err(format!("signing KMS {target}: {e}")))?
            .into_parts();
        let mut signed: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        signed.extend(instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())));
        // reqwest's blocking client runs its own runtime: keep it off any async worker thread
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Value, CryptoError> {
                    let client = openidconnect::reqwest::blocking::Client::builder()
                        .timeout(std::time::Duration::from_secs(10))
                        .redirect(openidconnect::reqwest::redirect::Policy::none())
                        .build()
                        .map_err(|e| err(format!("KMS client: {e}")))?;
                    let mut req = client.post(&url).body(body.clone());
                    for (k, v) in &signed {
                        req = req.header(k.as_str(), v.as_str());
                    }
                    let resp = req
                        .send()
                        .map_err(|_| err(format!("KMS {target}: endpoint unreachable")))?;
                    let status = resp.status();
                    let answer: Value = resp
                        .bytes()
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or(Value::Null);
                    if !status.is_success() {
                        let kind = answer
                            .get("__type")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown error")
                            .rsplit('#')
                            .next()
                            .unwrap_or("")
                            .to_string();
                        return Err(err(format!("KMS {target}: {} {kind}", status.as_u16())));
                    }
                    Ok(answer)
                })
                .join()
                .map_err(|_| err(format!("KMS {target}: request thread failed")))?
        })
    }

    fn context(version: u32) -> Value {
        json!({"fhirvault-key-version": version.to_string()})
    }

    /// A new 256-bit data key for `version`: its material, and the wrapped form to store.
    pub fn generate_data_key(&self, version: u32) -> Result<(KeyMaterial, String), CryptoError> {
        let answer = self.call(
            "GenerateDataKey",
            &json!({"KeyId": self.key_id, "KeySpec": "AES_256", "EncryptionContext": Self::context(version)}),
        )?;
        let material = material_of(&answer)?;
        let blob = answer
            .get("CiphertextBlob")
            .and_then(Value::as_str)
            .ok_or_else(|| err("KMS GenerateDataKey: no CiphertextBlob in the answer"))?;
        Ok((material, blob.to_string()))
    }

    /// Unwraps the stored data key of `version`.
    pub fn decrypt(&self, version: u32, blob: &str) -> Result<KeyMaterial, CryptoError> {
        let answer = self.call(
            "Decrypt",
            &json!({"KeyId": self.key_id, "CiphertextBlob": blob, "EncryptionContext": Self::context(version)}),
        )?;
        material_of(&answer)
    }
}

fn material_of(answer: &Value) -> Result<KeyMaterial, CryptoError> {
    let plain = Zeroizing::new(
        answer
            .get("Plaintext")
            .and_then(Value::as_str)
            .and_then(|p| B64.decode(p).ok())
            .ok_or_else(|| err("KMS: no key material in the answer"))?,
    );
    if plain.len() != 32 {
        return Err(err("KMS: the data key is not 256 bits"));
    }
    let mut k = Zeroizing::new([0u8; 32]);
    k.copy_from_slice(&plain);
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "secret");
        assert!(KmsClient::from_env(Some("http://kms.example.com"), "us-east-1", "k").is_err());
        assert!(KmsClient::from_env(Some("http://127.0.0.1:4566"), "us-east-1", "k").is_ok());
        let c = KmsClient::from_env(None, "eu-west-1", "k").unwrap();
        assert_eq!(c.endpoint, "https://kms.eu-west-1.amazonaws.com");
        assert!(!format!("{c:?}").contains("secret"));
    }
}
