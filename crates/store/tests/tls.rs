//! TLS to PostgreSQL on both pools, against a private server this test starts with
//! `ssl = on`, a certificate authority and a server certificate it makes (openssl), and
//! `pg_hba.conf` refusing every connection that is not TLS. The server's certificate names
//! `localhost` only, so `verify-full` to 127.0.0.1 must fail while `verify-ca` passes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use credit_store::db::{read_pool, write_pool};
use credit_store::{Database, DbConfig};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throwaway PostgreSQL server; stopped and deleted on drop.
struct PrivateServer {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PrivateServer {
    fn bin(name: &str) -> String {
        let local = Path::new(PG_BIN).join(name);
        if local.exists() {
            local.display().to_string()
        } else {
            name.to_owned()
        }
    }

    /// Runs a PostgreSQL program (as `postgres` when we are root: initdb refuses root).
    fn run(&self, program: &str, args: &[&str]) {
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &Self::bin(program)]);
            c
        } else {
            Command::new(Self::bin(program))
        };
        let out = cmd.args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "credit-ledger-tls-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // initdb refuses to run as root.
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let server = Self {
            dir,
            port,
            as_postgres,
        };
        server.make_certificates();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&server.dir)
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = server.dir.join("data");
        let data = data.to_str().unwrap();
        server.run(
            "initdb",
            &["-D", data, "-U", "postgres", "--auth=trust", "--no-sync"],
        );
        let d = server.dir.display();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\n\
             ssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
             fsync = off\nmax_connections = 40\n"
        );
        append(&format!("{data}/postgresql.conf"), &conf);
        // Only TLS connections get in.
        std::fs::write(
            format!("{data}/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let log = format!("{d}/server.log");
        server.run(
            "pg_ctl",
            &["-D", data, "-l", &log, "-w", "-t", "30", "start"],
        );
        server
    }

    fn make_certificates(&self) {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [
            ("ca", "credit-ledger test CA"),
            ("other-ca", "some other CA"),
        ] {
            let (key, crt, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut args = vec![
                "req", "-x509", "-days", "2", "-subj", &subj, "-keyout", &key, "-out", &crt,
            ];
            args.extend(ec);
            openssl(&args);
        }
        let mut args = vec![
            "req",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ];
        args.extend(ec);
        openssl(&args);
        std::fs::write(self.dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        let status = Command::new("chmod")
            .arg("600")
            .arg(self.dir.join("server.key"))
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/credit_ledger_tls?{params}",
            self.port
        )
    }

    fn cert(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &Self::bin("pg_ctl")]);
            c
        } else {
            Command::new(Self::bin("pg_ctl"))
        };
        let _ = cmd
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &str, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Both pools connect, and both connections are encrypted.
async fn both_pools_use_tls(url: &str) -> anyhow::Result<()> {
    let read = read_pool(url, 2)?;
    let client = read.get().await?;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(ssl, "the read pool's connection is not encrypted");
    let write = write_pool(url, 2).await?;
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&write)
            .await?;
    anyhow::ensure!(ssl, "the write pool's connection is not encrypted");
    write.close().await;
    Ok(())
}

#[tokio::test]
async fn both_pools_follow_sslmode_and_refuse_a_wrong_ca() {
    let server = tokio::task::spawn_blocking(PrivateServer::start)
        .await
        .unwrap();
    let ca = server.cert("ca.crt");
    let other = server.cert("other-ca.crt");

    // verify-full against our CA, by the name on the certificate: the whole start-up
    // (create the database, migrate, open both pools) runs over TLS.
    let url = server.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let db = Database::connect_and_migrate(&DbConfig::new(url.clone()))
        .await
        .unwrap_or_else(|e| panic!("verify-full: {e:#}"));
    db.write.close().await;
    both_pools_use_tls(&url).await.unwrap();

    // verify-ca checks the chain only: by a name on the certificate, both pools...
    let url = server.url("localhost", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    both_pools_use_tls(&url)
        .await
        .unwrap_or_else(|e| panic!("verify-ca: {e:#}"));
    // ...and by 127.0.0.1, which the certificate does not name, the read pool. (sqlx 0.8.6,
    // the write pool, compares the name under verify-ca too with this rustls: it expects
    // rustls' older `NotValidForName` error; see docs/CONFIGURATION.md.)
    let url = server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    let client = read_pool(&url, 1)
        .unwrap()
        .get()
        .await
        .unwrap_or_else(|e| panic!("verify-ca by address: {e:#}"));
    client.query_one("SELECT 1", &[]).await.unwrap();
    // require: encrypted, the certificate unchecked (libpq's meaning).
    both_pools_use_tls(&server.url("127.0.0.1", "sslmode=require"))
        .await
        .unwrap_or_else(|e| panic!("require: {e:#}"));

    // Refused: a certificate from another CA, a name the certificate does not carry, and
    // no TLS at all (the server takes only TLS).
    for (what, url) in [
        (
            "wrong CA",
            server.url(
                "localhost",
                &format!("sslmode=verify-ca&sslrootcert={other}"),
            ),
        ),
        (
            "wrong CA, verify-full",
            server.url(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={other}"),
            ),
        ),
        (
            "host not on the certificate",
            server.url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
        ),
        ("no TLS", server.url("127.0.0.1", "sslmode=disable")),
    ] {
        let read = read_pool(&url, 1).unwrap();
        assert!(read.get().await.is_err(), "read pool accepted: {what}");
        assert!(
            write_pool(&url, 1).await.is_err(),
            "write pool accepted: {what}"
        );
    }
}
