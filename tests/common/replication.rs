//! A PostgreSQL primary and a hot standby streaming from it, on loopback ports, started by the
//! test (`initdb`, `pg_basebackup`, streaming replication, optionally synchronous) and removed
//! when it ends: what an operator runs for failover, on one machine. The primary can be killed
//! (SIGKILL, the machine gone) and the standby promoted (`pg_ctl promote`).

use super::{find_pg_bin, free_port, initdb, is_root, pg_cmd, pg_ctl_start};
use diesel::connection::SimpleConnection;
use diesel::Connection;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct PgPair {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub primary_port: u16,
    pub standby_port: u16,
}

/// The name the standby streams under (`synchronous_standby_names` names it).
const STANDBY: &str = "standby1";

impl PgPair {
    /// A primary and a streaming standby; with `synchronous`, every commit on the primary waits
    /// until the standby has flushed it (`synchronous_standby_names`, `synchronous_commit = on`).
    pub fn start(synchronous: bool) -> PgPair {
        let bin = find_pg_bin();
        let dir = std::env::temp_dir().join(format!("fhirvault-pgpair-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot hand the cluster directory to the postgres user");
        }
        let pair = PgPair {
            bin,
            dir,
            primary_port: free_port(),
            standby_port: free_port(),
        };
        // removes both servers and the directory when this test process exits, however it exits
        let stop = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {runas}{pg_ctl} -D {p} -m immediate stop >/dev/null 2>&1; \
             {runas}{pg_ctl} -D {s} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            runas = if is_root() { "runuser -u postgres -- " } else { "" },
            pg_ctl = pair.bin.join("pg_ctl").display(),
            p = pair.primary_dir().display(),
            s = pair.standby_dir().display(),
            dir = pair.dir.display()
        );
        Command::new("sh")
            .args(["-c", &format!("({stop}) </dev/null >/dev/null 2>&1 &")])
            .status()
            .unwrap();
        initdb(&pair.bin, &pair.primary_dir());
        // initdb's defaults already stream: wal_level replica, max_wal_senders 10, hot_standby on,
        // and pg_hba.conf trusts replication from 127.0.0.1
        pair.start_server(&pair.primary_dir(), pair.primary_port, "primary.log");
        let out = pg_cmd(&pair.bin, "pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pair.primary_port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-R", "-X", "stream", "--no-sync", "-D"])
            .arg(pair.standby_dir())
            .output()
            .expect("running pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `-R` wrote standby.signal and a primary_conninfo; this one names the standby
        let auto = pair.standby_dir().join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap();
        conf.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={STANDBY}'\n",
            pair.primary_port
        ));
        std::fs::write(&auto, conf).unwrap();
        pair.start_server(&pair.standby_dir(), pair.standby_port, "standby.log");
        pair.wait_streaming();
        if synchronous {
            // only once the standby streams: set before, every commit would wait for it
            pair.primary_sql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{STANDBY}'"));
            pair.primary_sql("SELECT pg_reload_conf()");
            let deadline = Instant::now() + Duration::from_secs(30);
            while pair.primary_text("SELECT COALESCE(string_agg(sync_state, ','), '') AS v FROM pg_stat_replication")
                != "sync"
            {
                assert!(Instant::now() < deadline, "the standby did not become synchronous");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        pair
    }

    pub fn primary_dir(&self) -> PathBuf {
        self.dir.join("primary")
    }

    pub fn standby_dir(&self) -> PathBuf {
        self.dir.join("standby")
    }

    fn start_server(&self, data: &std::path::Path, port: u16, log: &str) {
        pg_ctl_start(&self.bin, data, port, &self.dir, &self.dir.join(log), true);
    }

    fn wait_streaming(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.primary_text("SELECT COALESCE(string_agg(state, ','), '') AS v FROM pg_stat_replication")
            != "streaming"
        {
            assert!(Instant::now() < deadline, "the standby did not start streaming");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn admin_url(port: u16, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/{db}")
    }

    /// Runs SQL as the superuser on the primary's `postgres` database.
    pub fn primary_sql(&self, sql: &str) {
        self.primary_sql_on("postgres", sql);
    }

    /// Runs SQL as the superuser on a database of the primary.
    pub fn primary_sql_on(&self, db: &str, sql: &str) {
        let mut c = diesel::PgConnection::establish(&Self::admin_url(self.primary_port, db)).unwrap();
        c.batch_execute(sql).unwrap();
    }

    fn primary_text(&self, sql: &str) -> String {
        use diesel::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct V {
            #[diesel(sql_type = diesel::sql_types::Text)]
            v: String,
        }
        let mut c = diesel::PgConnection::establish(&Self::admin_url(self.primary_port, "postgres")).unwrap();
        diesel::sql_query(sql).get_result::<V>(&mut c).unwrap().v
    }

    /// The primary's postmaster and standby's postmaster process ids.
    pub fn pids(&self) -> (u32, u32) {
        let pid = |dir: PathBuf| -> u32 {
            let text = std::fs::read_to_string(dir.join("postmaster.pid")).unwrap();
            text.lines().next().unwrap().trim().parse().unwrap()
        };
        (pid(self.primary_dir()), pid(self.standby_dir()))
    }

    /// A new database on the primary (replicated to the standby).
    pub fn create_db(&self, name: &str) -> String {
        self.primary_sql(&format!("CREATE DATABASE {name}"));
        name.to_string()
    }

    /// The URL an operator gives every node: both hosts, and libpq picks the one that takes
    /// writes (the primary; after a failover, the promoted standby).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
            self.primary_port, self.standby_port
        )
    }

    /// [`PgPair::url`] as another role.
    pub fn url_as(&self, role: &str, db: &str) -> String {
        self.url(db).replacen("postgres@", &format!("{role}@"), 1)
    }

    /// The standby alone, as `role` (a read replica's URL).
    pub fn standby_url_as(&self, role: &str, db: &str) -> String {
        format!("postgres://{role}@127.0.0.1:{}/{db}", self.standby_port)
    }

    /// The primary's machine is gone: SIGKILL to the postmaster and every one of its processes
    /// at once (no shutdown checkpoint, no goodbye to clients or to the standby).
    pub fn kill_primary(&self) {
        let pid_file = std::fs::read_to_string(self.primary_dir().join("postmaster.pid")).unwrap();
        let pid = pid_file.lines().next().unwrap().trim().to_string();
        let children = Command::new("pgrep").args(["-P", &pid]).output().unwrap();
        let mut pids: Vec<String> = vec![pid];
        pids.extend(
            String::from_utf8_lossy(&children.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        let ok = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .status()
            .unwrap()
            .success();
        assert!(ok, "could not kill the primary");
    }

    /// The standby falls behind (as across a slow or congested link): the primary's WAL sender
    /// stops streaming (SIGSTOP), so what is committed from now on stays on the primary alone
    /// (with synchronous replication, commits wait instead) until [`PgPair::resume_replication`]
    /// or until the primary dies with it.
    pub fn stall_replication(&self) {
        self.signal_wal_sender("-STOP");
    }

    pub fn resume_replication(&self) {
        self.signal_wal_sender("-CONT");
    }

    fn signal_wal_sender(&self, signal: &str) {
        let pid_file = std::fs::read_to_string(self.primary_dir().join("postmaster.pid")).unwrap();
        let postmaster = pid_file.lines().next().unwrap().trim().to_string();
        let ps = Command::new("ps")
            .args(["-o", "pid=,args=", "--ppid", &postmaster])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&ps.stdout);
        let sender = listing
            .lines()
            .find(|l| l.contains("walsender"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no WAL sender among the primary's processes: {listing}"));
        let ok = Command::new("kill").arg(signal).arg(sender).status().unwrap().success();
        assert!(ok, "could not signal the WAL sender");
    }

    /// Promotes the standby to primary and waits until it takes writes.
    pub fn promote(&self) {
        let out = pg_cmd(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.standby_dir())
            .args(["-w", "promote"])
            .output()
            .expect("running pg_ctl promote");
        assert!(
            out.status.success(),
            "promote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for data in [self.primary_dir(), self.standby_dir()] {
            let _ = pg_cmd(&self.bin, "pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
