//! A private PostgreSQL server for the tests: its own data directory (in a
//! temporary directory), a free port on 127.0.0.1, the unix socket inside the
//! data directory, password authentication over TCP. One server serves every
//! test of a test binary that runs at the same time; it is stopped
//! (`pg_ctl stop -m immediate`) when the last of them drops its handle.
//!
//! PostgreSQL refuses to run as root, so as root the server binaries run as
//! the `postgres` user (`runuser -u postgres --`) on a directory chowned to
//! it. The binaries come from `CORDON_PG_BIN` or the newest
//! `/usr/lib/postgresql/*/bin`; `scripts/install-postgres` installs them. If
//! none are found the tests fail with that fix: they never skip silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};

/// The login role with read permissions only, as the operator would create.
pub const RO_ROLE: &str = "cordon_ro";
/// A role an operator should not use, with write permissions (on the test
/// schemas, and to server files for `COPY ... TO`): the host's read-only
/// transactions must stop it all the same.
pub const RW_ROLE: &str = "cordon_rw";
/// The password of both roles.
pub const PASSWORD: &str = "s3cret-for-tests";

/// A running server; stopped when the last `Arc` is dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    /// The server shared by the tests running now, started if none is.
    pub fn shared() -> Arc<Postgres> {
        static SHARED: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pg) = shared.upgrade() {
            return pg;
        }
        let pg = Arc::new(Postgres::start());
        *shared = Arc::downgrade(&pg);
        pg
    }

    fn start() -> Postgres {
        let bin = find_bin();
        let dir = tempfile::Builder::new()
            .prefix("cordon-pg-")
            .tempdir()
            .expect("creating the PostgreSQL directory");
        let as_postgres = is_root();
        let data = dir.path().join("data");
        let sockets = dir.path().join("sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, "superuser-password\n").unwrap();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("running chown");
            assert!(status.success(), "chown of the PostgreSQL directory failed");
        }
        let pg = Postgres {
            port: free_port(),
            dir,
            bin,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--pwfile".as_ref(),
                pwfile.as_os_str(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                "--no-sync".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
            ],
        );
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c log_min_duration_statement=1000 -c log_lock_waits=on",
            pg.port,
            sockets.display()
        );
        let log = pg.log_path();
        pg.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        );
        pg.superuser_sql(
            "postgres",
            &format!(
                "CREATE ROLE {RO_ROLE} LOGIN PASSWORD '{PASSWORD}';
                 CREATE ROLE {RW_ROLE} LOGIN PASSWORD '{PASSWORD}';
                 GRANT pg_write_server_files TO {RW_ROLE};"
            ),
        );
        pg
    }

    /// Runs one of the server binaries (as `postgres` when we are root) and
    /// panics with its output if it fails.
    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            panic!(
                "{tool} failed: {}\n{}\nserver log:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The server's log: errors, statements slower than 1 s, lock waits.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The directory holding the unix socket (superuser access, trust).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sockets")
    }

    /// A connection string for `role` on `database` over TCP, without the
    /// password (tests hand it over through `password_file`).
    pub fn dsn(&self, role: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={role} dbname={database}",
            self.port
        )
    }

    /// A superuser connection to `database` over the unix socket.
    pub async fn superuser(&self, database: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.socket_dir())
            .port(self.port)
            .user("postgres")
            .dbname(database);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("superuser connection");
        tokio::spawn(connection);
        client
    }

    /// Runs `sql` as the superuser in `database`, with `psql`, synchronously.
    pub fn superuser_sql(&self, database: &str, sql: &str) {
        let socket = self.socket_dir();
        let port = self.port.to_string();
        self.run(
            "psql",
            &[
                "-X".as_ref(),
                "-q".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-h".as_ref(),
                socket.as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-d".as_ref(),
                database.as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
        );
    }

    /// Creates the database `name` and runs `setup` in it as the superuser.
    pub fn create_database(&self, name: &str, setup: &str) {
        self.superuser_sql("postgres", &format!("CREATE DATABASE {name}"));
        self.superuser_sql(name, setup);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            cmd
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd
            .args([
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "stop".as_ref(),
            ])
            .args(["-w"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `CORDON_PG_BIN`, or the newest `/usr/lib/postgresql/*/bin` with initdb.
fn find_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("CORDON_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            Path::new(&bin.join("initdb"))
                .exists()
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb and no \
             CORDON_PG_BIN): run scripts/install-postgres, or set CORDON_PG_BIN to the directory \
             holding initdb, pg_ctl and psql"
        ),
    }
}
