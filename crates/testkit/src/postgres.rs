//! A private PostgreSQL server for the tests that stop, restart or starve the database
//! (issue 11's fault tests): made with `initdb` in a temporary directory, listening on a port
//! of its own on loopback, so it disturbs no other test. Stopped and removed when dropped.
//!
//! The server binaries are found in `PG_BIN_DIR`, else the newest
//! `/usr/lib/postgresql/<version>/bin`. PostgreSQL refuses to run as root: as root, the
//! server runs as the `postgres` system user (through `runuser`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    as_root: bool,
}

impl PrivatePostgres {
    /// Initialises and starts a new server (trust authentication, user `postgres`).
    pub fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("credit-ledger-pg-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let server = Self {
            dir,
            port,
            bin,
            as_root,
        };
        if as_root {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&server.dir))?;
        }
        run(server
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(server.data()))?;
        server.pg_ctl(&["start"])?;
        Ok(server)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// `pg_ctl restart -m fast`: every backend is terminated, the server comes back.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["restart", "-m", "fast"])
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, action: &[&str]) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        run(self
            .command("pg_ctl")
            .args(action)
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &options]))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = run(self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("no PostgreSQL under {} (set PG_BIN_DIR)", root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no initdb under /usr/lib/postgresql/*/bin (set PG_BIN_DIR)")
}
