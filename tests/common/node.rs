//! Real server processes for the multi-node and failover tests: the binary serving on a port
//! of its own, started, stopped (SIGTERM), killed (SIGKILL) and read back through its log.

use diesel::Connection;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fhirvault"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FHIRVAULT_") {
            c.env_remove(k);
        }
    }
    c
}

/// A node: the binary serving on `port`, its output in `log`.
pub struct Node {
    pub port: u16,
    pub child: Option<Child>,
    pub log: std::path::PathBuf,
    /// Settings of this node alone (`FHIRVAULT_*`).
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn start(data: &Path, url: &str, port: u16, name: &str) -> Node {
        Node::start_with(data, url, port, name, &[])
    }

    pub fn start_with(data: &Path, url: &str, port: u16, name: &str, env: &[(&str, &str)]) -> Node {
        let log = data.parent().unwrap().join(format!("{name}.log"));
        let mut node = Node {
            port,
            child: None,
            log,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        node.spawn(data, url);
        node
    }

    pub fn spawn(&mut self, data: &Path, url: &str) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = bin()
            .arg("serve")
            .arg("--data-dir")
            .arg(data)
            .arg("--database-url")
            .arg(url)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("FHIRVAULT_POOL_SIZE", "8")
            .env("FHIRVAULT_AUTH_FAILURE_LIMIT", "1000000")
            .env("FHIRVAULT_AUDIT_CHECKPOINT_SECS", "1")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        let http = reqwest::blocking::Client::new();
        loop {
            if http
                .get(format!("http://127.0.0.1:{}/healthz", self.port))
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "node exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "node did not start: {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn count(url: &str, sql: &str) -> i64 {
    use diesel::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut c = diesel::PgConnection::establish(url).unwrap();
    let rows: Vec<N> = diesel::sql_query(sql).load(&mut c).unwrap();
    rows[0].n
}

/// A `system/*.cruds` token from the nodes' shared issuer key (`fhirvault token`).
pub fn token(data: &Path, url: &str) -> String {
    let out = bin()
        .args(["token", "--scope", "system/*.cruds", "--data-dir"])
        .arg(data)
        .arg("--database-url")
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn verify(data: &Path, url: &str) -> std::process::Output {
    bin()
        .args(["audit", "verify", "--data-dir"])
        .arg(data)
        .arg("--database-url")
        .arg(url)
        .output()
        .unwrap()
}
