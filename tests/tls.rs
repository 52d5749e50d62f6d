//! TLS on the real binary: TLS 1.3 and 1.2 accepted, TLS 1.1 and plaintext refused, the
//! security headers on every response, and a certificate reloaded on SIGHUP without dropping
//! the connections already open.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Accepts the test's self-signed certificate (signatures are still checked).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(port: u16, version: &'static rustls::SupportedProtocolVersion) -> Result<Tls, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[version])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
        .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

/// One keep-alive GET; returns the status line and the lower-cased header lines.
fn get(tls: &mut Tls, path: &str) -> (String, Vec<String>) {
    write!(tls, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    tls.flush().unwrap();
    let mut reader = BufReader::new(tls);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let lower = line.trim_end().to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        headers.push(lower);
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    (status.trim_end().to_string(), headers)
}

fn make_cert(dir: &Path, cn: &str) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(dir.join("key.pem.new"))
        .arg("-out")
        .arg(dir.join("cert.pem.new"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("key.pem.new"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peer_cert(tls: &Tls) -> Vec<u8> {
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn tls_versions_headers_and_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "first");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_fhirvault"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path().join("data"))
        .env("FHIRVAULT_TLS_CERT_FILE", dir.path().join("cert.pem"))
        .env("FHIRVAULT_TLS_KEY_FILE", dir.path().join("key.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let mut ready = None;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(c) = connect(port, &rustls::version::TLS13) {
            ready = Some(c);
            break;
        }
    }
    let mut first = ready.expect("the TLS server did not come up");
    assert_eq!(first.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let (status, headers) = get(&mut first, "/fhir/metadata");
    assert!(status.contains(" 200 "), "{status}");
    for h in [
        "strict-transport-security: max-age=",
        "x-content-type-options: nosniff",
        "cache-control: no-store",
        "frame-ancestors 'none'",
    ] {
        assert!(headers.iter().any(|l| l.contains(h)), "{h} missing: {headers:?}");
    }
    // TLS 1.2 too
    let mut twelve = connect(port, &rustls::version::TLS12).unwrap();
    assert_eq!(twelve.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert!(get(&mut twelve, "/fhir/metadata").0.contains(" 200 "));
    // TLS 1.1 is refused (the client is allowed it explicitly, so the refusal is the server's)
    let out = Command::new("openssl")
        .args(["s_client", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "TLS 1.1 handshake succeeded:\n{text}");
    assert!(
        text.contains("alert protocol version") || text.contains("handshake failure"),
        "{text}"
    );
    // plaintext HTTP gets no response
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    plain
        .write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    let n = plain.read(&mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // reload: a new certificate for new connections, the open one carries on
    let before = peer_cert(&first);
    make_cert(dir.path(), "second");
    let hup = Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut after = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let c = connect(port, &rustls::version::TLS13).unwrap();
        if peer_cert(&c) != before {
            after = Some(c);
            break;
        }
    }
    let mut after = after.expect("the new certificate was not served after SIGHUP");
    assert!(get(&mut after, "/fhir/metadata").0.contains(" 200 "));
    assert!(
        get(&mut first, "/fhir/metadata").0.contains(" 200 "),
        "the open connection was dropped"
    );
    assert_eq!(peer_cert(&first), before);
    // a broken file on the next SIGHUP leaves the current certificate in place
    std::fs::write(dir.path().join("cert.pem"), b"not a certificate").unwrap();
    Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let again = connect(port, &rustls::version::TLS13).unwrap();
    assert_eq!(peer_cert(&again), peer_cert(&after));
}

#[test]
fn tls_settings_are_checked_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "x");
    let run = |env: &[(&str, &Path)], listen: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
        c.args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        match child.try_wait().unwrap() {
            Some(_) => {
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                Err(err)
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Ok(())
            }
        }
    };
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    // one without the other
    let err = run(&[("FHIRVAULT_TLS_CERT_FILE", &cert)], "127.0.0.1:0").unwrap_err();
    assert!(err.contains("tls_key_file"), "{err}");
    // a key readable by others
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = run(
        &[("FHIRVAULT_TLS_CERT_FILE", &cert), ("FHIRVAULT_TLS_KEY_FILE", &key)],
        "127.0.0.1:0",
    )
    .unwrap_err();
    assert!(err.contains("key.pem"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // with TLS, a non-loopback address is allowed; without, it is refused
    assert!(run(&[], "0.0.0.0:0").is_err());
    run(
        &[("FHIRVAULT_TLS_CERT_FILE", &cert), ("FHIRVAULT_TLS_KEY_FILE", &key)],
        "0.0.0.0:0",
    )
    .unwrap();
}
