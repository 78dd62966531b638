//! The `cordon` command line. It only parses arguments and reports; the work
//! happens in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cordon::app::App;
use cordon::auth::{AuthMode, Authenticator};
use cordon::config::Config;
use cordon::dispatch::{CallOrigin, CallRequest, Principal};
use cordon::runtime::{CallEvent, EventSink, LogLevel};
use tokio_util::sync::CancellationToken;

/// Cordon: runs untrusted MCP tools as sandboxed WebAssembly components.
#[derive(Parser)]
#[command(name = "cordon", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Let the MCP library log what clients send: whole protocol messages
    /// (tool arguments and results included) at debug/trace level, and its
    /// per-connection lines (client info, notifications, error replies,
    /// disconnects). Off: its message loop does not log at all and the rest
    /// of it is capped at info, whatever RUST_LOG says, so arguments and
    /// other client-chosen text never reach the log.
    #[arg(long, global = true, env = "CORDON_LOG_PROTOCOL")]
    log_protocol: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The config file (TOML). Without it, the built-in demo config is used.
    #[arg(long, short = 'c', env = "CORDON_CONFIG")]
    config: Option<PathBuf>,
}

/// Who local use (`call`, `stdio`) acts as.
#[derive(clap::Args)]
struct PrincipalArgs {
    /// The tenant whose grants and policy apply (default: `server.local_tenant`).
    #[arg(long)]
    tenant: Option<String>,
    /// A role (repeatable; default: `server.local_roles`).
    #[arg(long = "role")]
    roles: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Work with database files (see `[databases]` in the config).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Serve the tools over HTTP: Streamable HTTP (sessions and stateless
    /// 2026-07-28) at /mcp, classic HTTP+SSE at /sse + /messages.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Listen address (overrides `server.listen`; default 127.0.0.1:8750).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Serve the tools over stdio, for a local client that launches Cordon.
    Stdio {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        principal: PrincipalArgs,
    },
    /// Work with the loaded tools.
    Tools {
        #[command(subcommand)]
        command: ToolsCommand,
    },
    /// Run one tool call locally and print the MCP result as JSON.
    Call {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        principal: PrincipalArgs,
        /// The tool name.
        tool: String,
        /// The arguments, a JSON object.
        #[arg(default_value = "{}")]
        arguments: String,
    },
    /// Show what a component imports and exports and which tools it provides.
    Inspect {
        /// The .wasm file.
        file: PathBuf,
    },
    /// Check a configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Mint development tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Read and verify the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum ToolsCommand {
    /// Every loaded tool with its description and schemas.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the MCP tool definitions as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a JWT that a server running the same config accepts, signed
    /// with its HS256 development key.
    Issue {
        #[command(flatten)]
        config: ConfigArg,
        /// The tenant the token acts for.
        #[arg(long)]
        tenant: String,
        /// A role (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// The subject (`sub`).
        #[arg(long, default_value = "developer")]
        subject: String,
        /// Lifetime, e.g. `15m`, `1h`, `7d`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The `kid` of the key to sign with (default: the first HS* key).
        #[arg(long)]
        kid: Option<String>,
    },
}

#[derive(clap::Args)]
struct AuditFileArg {
    /// The audit log (default: `audit.path` of the config).
    #[arg(long)]
    file: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain; says where it breaks (exit status 1).
    Verify {
        /// The audit log.
        file: PathBuf,
    },
    /// Print the last records.
    Tail {
        #[command(flatten)]
        source: AuditFileArg,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
    /// Print the records that match every filter given.
    Query {
        #[command(flatten)]
        source: AuditFileArg,
        /// Tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Tool name.
        #[arg(long)]
        tool: Option<String>,
        /// Outcome (`ok`, `denied`, `timeout`, …).
        #[arg(long)]
        outcome: Option<String>,
        /// Event (`call`, `auth_failure`, `quota`, `reload`, `db_denied`, `admin`).
        #[arg(long)]
        event: Option<String>,
        /// Not before: an RFC 3339 time or an age such as `15m`, `2h`, `1d`.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration and print every problem.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` exports spans when its config asks; the config is checked
    // again (and reported) when the command runs.
    let telemetry = match &cli.command {
        Command::Serve { config, .. } => Config::read_unchecked(config.config.as_deref())
            .map(|c| c.telemetry)
            .unwrap_or_default(),
        _ => Default::default(),
    };
    let tracer_provider = match init_logging(cli.log_format, cli.log_protocol, &telemetry) {
        Ok(provider) => provider,
        Err(e) => {
            eprintln!(
                "error: cannot set up the OpenTelemetry export (telemetry.otlp_endpoint): {e:#}"
            );
            return ExitCode::FAILURE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Workers tear a finished call's instance down, and prepare the next
    // call's, when idle: after the reply has gone out.
    cordon::runtime::use_idle_time(&mut builder);
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    // Sends the spans still batched.
    if let Some(provider) = tracer_provider
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: the last spans could not be exported: {e}");
    }
    code
}

/// Logs to stderr (human or JSON, level from `RUST_LOG`), plus OTLP export
/// when `telemetry` names an endpoint; returns its provider to shut down.
fn init_logging(
    format: LogFormat,
    log_protocol: bool,
    telemetry: &cordon::telemetry::TelemetryConfig,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !log_protocol {
        // rmcp logs every message it receives at debug (arguments and all).
        // Its message loop (`rmcp::service`) also logs, at info to error,
        // the client's `clientInfo`, notification params, cancellation
        // reasons and error replies, unbounded; and an error line for every
        // client that goes away mid-request. Cordon's own log and the audit
        // record cover calls, so that loop is off.
        for directive in ["rmcp=info", "rmcp::service=off"] {
            if let Ok(directive) = directive.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (provider, otel) = match telemetry.tracer()? {
        Some((provider, tracer)) => (
            Some(provider),
            Some(tracing_opentelemetry::layer().with_tracer(tracer)),
        ),
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    Ok(provider)
}

fn load_config(arg: &ConfigArg) -> anyhow::Result<Config> {
    Ok(match &arg.config {
        Some(path) => Config::load(path)?,
        None => {
            tracing::info!("no --config given: using the built-in demo config");
            Config::demo().context(
                "run `scripts/demo` once to build the example tools, or pass --config FILE",
            )?
        }
    })
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config, listen } => {
            let path = config.config.clone();
            let mut config = load_config(&config)?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            serve(config, path).await
        }
        Command::Stdio { config, principal } => {
            let config = load_config(&config)?;
            let principal = local_principal(&config, principal, "stdio")?;
            let app = App::open(config, true).await?;
            report_problems(&app);
            let handler = cordon::mcp::McpHandler::new(app.dispatcher.clone(), principal)
                .with_transport("stdio");
            let service = rmcp::ServiceExt::serve(handler, rmcp::transport::io::stdio())
                .await
                .context("the stdio client did not complete the MCP handshake")?;
            service
                .waiting()
                .await
                .context("the stdio session failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Tools {
            command: ToolsCommand::List { config, json },
        } => {
            // Listing calls nothing: no audit log (a running server may hold it).
            let mut config = load_config(&config)?;
            config.audit.enabled = false;
            let app = App::open(config, false).await?;
            // The operator's view: every loaded tool, whoever may call it.
            let tools: Vec<_> = app
                .dispatcher
                .registry()
                .snapshot()
                .tools()
                .map(|entry| entry.info.tool.clone())
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&tools)?);
            } else {
                for tool in &tools {
                    println!("{}", tool.name);
                    if let Some(description) = &tool.description {
                        println!("    {description}");
                    }
                    println!("    input: {}", serde_json::to_string(&tool.input_schema)?);
                    if let Some(output) = &tool.output_schema {
                        println!("    output: {}", serde_json::to_string(output)?);
                    }
                }
            }
            Ok(report_problems(&app))
        }
        Command::Call {
            config,
            principal,
            tool,
            arguments,
        } => {
            let arguments: serde_json::Value = serde_json::from_str(&arguments)
                .context("the arguments must be a JSON object, e.g. '{\"text\":\"hi\"}'")?;
            let config = load_config(&config)?;
            let principal = local_principal(&config, principal, "cli")?;
            let app = App::open(config, false).await?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let printer = tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    match event {
                        CallEvent::Log {
                            level,
                            logger,
                            data,
                        } => {
                            eprintln!(
                                "[{level:?}] {}{data}",
                                logger.map(|l| format!("{l}: ")).unwrap_or_default()
                            )
                        }
                        CallEvent::Progress {
                            progress,
                            total,
                            message,
                        } => eprintln!(
                            "[progress] {progress}{} {}",
                            total.map(|t| format!("/{t}")).unwrap_or_default(),
                            message.unwrap_or_default()
                        ),
                    }
                }
            });
            let outcome = app
                .dispatcher
                .call(
                    &principal,
                    CallRequest {
                        tool,
                        arguments,
                        events: EventSink::new(tx, Some(LogLevel::Debug), true),
                        cancel: Default::default(),
                        origin: CallOrigin {
                            transport: "cli",
                            ..CallOrigin::default()
                        },
                    },
                )
                .await;
            let _ = printer.await;
            match outcome.result {
                Ok(result) => {
                    println!("{}", serde_json::to_string_pretty(&result)?);
                    Ok(if result.is_error == Some(true) {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    })
                }
                Err(failure) => {
                    eprintln!("error ({}): {failure}", failure.kind());
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Db { command } => db_command(command),
        Command::Inspect { file } => inspect(&file).await,
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            // Every problem at once: the values, then what only loading shows.
            let config = Config::read_unchecked(config.config.as_deref())?;
            let problems = runtime_problems(&config);
            if !problems.is_empty() {
                eprintln!("the configuration has {} problem(s):", problems.len());
                for (key, message) in &problems {
                    eprintln!("  - {key}: {message}");
                }
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "configuration OK: {} tool component(s) configured, {} tenant(s), tools from {}",
                config.tools.len(),
                config.tenants.len(),
                config.tools_dir().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command:
                TokenCommand::Issue {
                    config,
                    tenant,
                    roles,
                    subject,
                    ttl,
                    kid,
                },
        } => {
            let config = load_config(&config)?;
            if !config.tenants.is_empty() && !config.tenants.contains_key(&tenant) {
                anyhow::bail!("tenant {tenant:?} is not declared in [tenants]");
            }
            let authenticator = authenticator(&config)?;
            let principal = Principal {
                tenant,
                subject,
                roles,
            };
            println!("{}", authenticator.issue(&principal, ttl, kid.as_deref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => audit(command),
    }
}

fn report_problems(app: &App) -> ExitCode {
    let snapshot = app.dispatcher.registry().snapshot();
    for problem in snapshot.problems() {
        eprintln!("warning: {problem}");
    }
    if snapshot.problems().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

async fn inspect(file: &Path) -> anyhow::Result<ExitCode> {
    let report = cordon::runtime::inspect(file).await?;
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// The principal of local use (CLI `call`, `stdio`): named on the command
/// line, or `server.local_tenant` / `server.local_roles`.
fn local_principal(
    config: &Config,
    args: PrincipalArgs,
    subject: &str,
) -> anyhow::Result<Principal> {
    let mut principal = config.server.local_principal();
    principal.subject = subject.into();
    if let Some(tenant) = args.tenant {
        principal.tenant = tenant;
    }
    if !args.roles.is_empty() {
        principal.roles = args.roles;
    }
    if !cordon::config::valid_tenant_id(&principal.tenant) {
        anyhow::bail!(
            "tenant {:?} is not a valid tenant id (use 1-64 of a-z 0-9 _ -)",
            principal.tenant
        );
    }
    if !config.tenants.is_empty() && !config.tenants.contains_key(&principal.tenant) {
        anyhow::bail!("tenant {:?} is not declared in [tenants]", principal.tenant);
    }
    Ok(principal)
}

/// Problems as an indented list, one `  - key: message` per line.
fn problem_list(problems: &[(String, String)]) -> String {
    problems
        .iter()
        .map(|(key, message)| format!("  - {key}: {message}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The authenticator of `config`, or every problem with its keys.
fn authenticator(config: &Config) -> anyhow::Result<Authenticator> {
    Authenticator::new(&config.auth, &config.base_dir).map_err(|problems| {
        anyhow::anyhow!(
            "the [auth] keys cannot be loaded:\n{}",
            problem_list(&problems)
        )
    })
}

/// What the static config check cannot see: keys and certificates that do
/// not load, and the checks that depend on the final listen address.
fn runtime_problems(config: &Config) -> Vec<(String, String)> {
    let mut problems: Vec<(String, String)> = config
        .problems()
        .into_iter()
        .map(|p| (p.key, p.message))
        .collect();
    if let Err(keys) = Authenticator::new(&config.auth, &config.base_dir) {
        problems.extend(keys);
    }
    if let Some(tls) = &config.server.tls
        && let Err(e) = cordon::tls::server_config(tls, &config.base_dir)
    {
        problems.push(("server.tls".into(), format!("{e:#}")));
    }
    // PostgreSQL connection strings and passwords are read here too.
    if let Err(e) = cordon::db::Databases::open(&config.databases, &config.base_dir) {
        problems.push(("databases".into(), e.to_string()));
    }
    problems
}

fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    use cordon::audit;
    let path_of = |source: AuditFileArg| -> anyhow::Result<PathBuf> {
        Ok(match source.file {
            Some(file) => file,
            None => {
                let config = load_config(&source.config)?;
                config.base_dir.join(&config.audit.path)
            }
        })
    };
    match command {
        AuditCommand::Verify { file } => match audit::verify(&file) {
            Ok(report) => {
                println!("{report}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("audit log {} does NOT verify: {e}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
        AuditCommand::Tail { source, lines } => {
            for record in audit::tail(&path_of(source)?, lines)? {
                println!("{}", serde_json::to_string(&record)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Query {
            source,
            tenant,
            tool,
            outcome,
            event,
            since,
        } => {
            let query = audit::Query {
                tenant,
                tool,
                outcome,
                event: event
                    .map(|e| e.parse())
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                since: since.map(|s| audit::parse_since(&s)).transpose()?,
            };
            for record in audit::read_records(&path_of(source)?)? {
                let record = record?;
                if query.matches(&record) {
                    println!("{}", serde_json::to_string(&record)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let demo = config_path.is_none();
    let problems = runtime_problems(&config);
    if !problems.is_empty() {
        anyhow::bail!(
            "refusing to start; the configuration has {} problem(s):\n{}",
            problems.len(),
            problem_list(&problems)
        );
    }
    let authenticator = std::sync::Arc::new(authenticator(&config)?);
    let tls = match &config.server.tls {
        Some(tls) => Some(cordon::tls::server_config(tls, &config.base_dir)?),
        None => None,
    };
    let server = config.server.clone();
    let dev_token = if demo {
        let defaults = PrincipalArgs {
            tenant: None,
            roles: Vec::new(),
        };
        let principal = local_principal(&config, defaults, "demo-user")?;
        Some(authenticator.issue(&principal, std::time::Duration::from_secs(12 * 3600), None)?)
    } else {
        None
    };
    let app = App::open(config, true).await?;
    report_problems(&app);
    let tools = app.dispatcher.registry().snapshot().tools().count();
    let listener = tokio::net::TcpListener::bind(server.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (server.listen / --listen)",
                server.listen
            )
        })?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Cordon's own origin is always allowed (the port is known only now, with
    // --listen :0): a page served from elsewhere, or a rebinding attack that
    // carries a foreign Host, is still refused.
    let mut server = server;
    let port = listener.local_addr()?.port();
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        server
            .allowed_origins
            .push(format!("{scheme}://{host}:{port}"));
    }
    let shutdown = CancellationToken::new();
    let router = cordon::server::router(
        app.dispatcher.clone(),
        authenticator.clone(),
        &server,
        shutdown.clone(),
    );
    let url = format!(
        "{scheme}://{}{}",
        listener.local_addr()?,
        cordon::server::MCP_PATH
    );
    match authenticator.mode() {
        AuthMode::None => tracing::warn!(
            "AUTHENTICATION IS OFF (auth.mode = \"none\"): every local caller acts as tenant `{}`; use this only for development",
            server.local_tenant
        ),
        AuthMode::Tokens => {
            tracing::info!("every request must carry a bearer token (JWT or API key)")
        }
    }
    match &tls {
        Some(_) => tracing::info!("serving HTTPS (rustls)"),
        None if server.listen.ip().is_loopback() => {
            tracing::info!("serving plain HTTP on loopback")
        }
        None => tracing::warn!(
            "serving PLAIN HTTP on {} (server.allow_plain_http): put a TLS proxy in front",
            server.listen
        ),
    }
    tracing::info!(tools, %url, "serving MCP (Streamable HTTP at /mcp, HTTP+SSE at /sse); press Ctrl-C to stop");
    let client_config = match &dev_token {
        Some(token) => format!(
            "{{\"mcpServers\": {{\"cordon\": {{\"type\": \"http\", \"url\": \"{url}\", \"headers\": {{\"Authorization\": \"Bearer {token}\"}}}}}}}}"
        ),
        None => format!(
            "{{\"mcpServers\": {{\"cordon\": {{\"type\": \"http\", \"url\": \"{url}\", \"headers\": {{\"Authorization\": \"Bearer <token>\"}}}}}}}}"
        ),
    };
    eprintln!(
        "\nCordon is serving {tools} tool(s) at {url}\n\
         Client configuration (Cursor, VS Code, Claude Code):\n  {client_config}\n\
         MCP Inspector: npx @modelcontextprotocol/inspector, transport \"Streamable HTTP\", URL {url}{}\n",
        match &dev_token {
            Some(token) => format!(
                ", header Authorization: Bearer <the token below>\n\
                 Development token (tenant `{}`, 12 h; mint more with `cordon token issue --tenant T --role R`):\n  {token}",
                server.local_tenant
            ),
            None => String::new(),
        }
    );
    let stop_accepting = CancellationToken::new();
    let header_timeout = std::time::Duration::from_secs(server.header_timeout_secs);
    let mut server_task = match tls {
        Some(tls) => tokio::spawn(cordon::server::serve_tls_on(
            listener,
            router,
            tls,
            header_timeout,
            stop_accepting.clone(),
        )),
        None => tokio::spawn(cordon::server::serve_on(
            listener,
            router,
            header_timeout,
            stop_accepting.clone(),
        )),
    };

    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                match reload_config(config_path.as_deref(), &app, &authenticator, &server).await {
                    Ok(()) => tracing::info!("configuration reloaded (SIGHUP)"),
                    Err(e) => tracing::error!("configuration NOT reloaded, the previous one stays in force: {e:#}"),
                }
            }
            finished = &mut server_task => {
                finished.context("the server task failed")??;
                anyhow::bail!("the server stopped unexpectedly");
            }
        }
    }

    // Stop accepting, let running calls finish within the grace period,
    // cancel the rest, end every session and stream, then flush the audit log.
    let grace = std::time::Duration::from_secs(server.shutdown_grace_secs);
    tracing::info!(
        running = app.dispatcher.in_flight(),
        grace_secs = grace.as_secs(),
        "shutting down: no new connections; waiting for running calls"
    );
    stop_accepting.cancel();
    let cancelled = app.dispatcher.drain(grace).await;
    if cancelled > 0 {
        tracing::warn!(
            cancelled,
            "calls still running after the grace period were cancelled"
        );
    }
    // A call that just returned still has its response to write: give the
    // transports a moment before ending the sessions those responses use.
    // (Connections without an open stream close on their own meanwhile.)
    let settle = tokio::time::sleep(std::time::Duration::from_millis(500));
    let mut ended = None;
    tokio::select! {
        _ = settle => {}
        result = &mut server_task => ended = Some(result),
    }
    shutdown.cancel();
    let ended = match ended {
        Some(result) => Ok(result),
        None => tokio::time::timeout(std::time::Duration::from_secs(10), server_task).await,
    };
    match ended {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!("the server ended with an error: {e:#}"),
        Ok(Err(e)) => tracing::error!("the server task failed: {e}"),
        Err(_) => tracing::warn!("connections still open after 10 s; closing them"),
    }
    app.dispatcher.audit().flush().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: reads the config again and, if it passes every check, puts its
/// policy, tenants, grants, limits, keys and tool pins in force for the
/// requests that follow, without touching open sessions. Listener settings
/// (`[server]`) need a restart.
async fn reload_config(
    path: Option<&Path>,
    app: &App,
    authenticator: &Authenticator,
    server: &cordon::config::ServerConfig,
) -> anyhow::Result<()> {
    let mut config = match path {
        Some(path) => Config::load(path)?,
        None => Config::demo()?,
    };
    // The listener keeps its settings (and any --listen) until a restart.
    if config.server.listen != server.listen && path.is_some() {
        tracing::warn!(
            "server.listen changed: restart Cordon to listen on {}",
            config.server.listen
        );
    }
    config.server.listen = server.listen;
    let problems = runtime_problems(&config);
    if !problems.is_empty() {
        anyhow::bail!(
            "{} problem(s):\n{}",
            problems.len(),
            problem_list(&problems)
        );
    }
    let keys = self::authenticator(&config)?;
    let settings = cordon::dispatch::Settings::new(config)?;
    authenticator.replace(keys).map_err(anyhow::Error::msg)?;
    let registry = app.dispatcher.registry().clone();
    registry.set_source(settings.config.tool_source());
    app.dispatcher.replace_settings(settings);
    registry.reload().await;
    app.dispatcher
        .audit()
        .record_detached(cordon::audit::AuditEvent {
            event: cordon::audit::EventKind::Admin,
            transport: Some("signal".into()),
            outcome: Some("ok".into()),
            reason: Some("configuration reloaded (SIGHUP)".into()),
            ..Default::default()
        });
    Ok(())
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create a SQLite database from a SQL script (for demos and tests:
    /// databases are generated, never committed). Refuses to overwrite.
    Seed {
        /// The SQL script.
        #[arg(long)]
        sql: PathBuf,
        /// The database file to create.
        #[arg(long)]
        out: PathBuf,
    },
}

fn db_command(command: DbCommand) -> anyhow::Result<ExitCode> {
    match command {
        DbCommand::Seed { sql, out } => {
            cordon::db::seed(&sql, &out)?;
            println!("created {} from {}", out.display(), sql.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
