//! The `cordon` command line. It only parses arguments and reports; the work
//! happens in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cordon::app::App;
use cordon::config::Config;
use cordon::dispatch::{CallRequest, Principal};
use cordon::runtime::{CallEvent, EventSink, LogLevel};
use tokio_util::sync::CancellationToken;

/// Cordon: runs untrusted MCP tools as sandboxed WebAssembly components.
#[derive(Parser)]
#[command(name = "cordon", version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
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

#[derive(Subcommand)]
enum Command {
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
        /// The tenant whose grants apply.
        #[arg(long, default_value = "local")]
        tenant: String,
        /// Roles of the local principal (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
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
        /// The tenant whose grants apply.
        #[arg(long, default_value = "local")]
        tenant: String,
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
enum ConfigCommand {
    /// Validate a configuration and print every problem.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
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
            let mut config = load_config(&config)?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            serve(config).await
        }
        Command::Stdio {
            config,
            tenant,
            roles,
        } => {
            let app = App::open(load_config(&config)?, true).await?;
            report_problems(&app);
            let principal = Principal {
                tenant,
                subject: "stdio".into(),
                roles,
            };
            let handler = cordon::mcp::McpHandler::new(app.dispatcher.clone(), principal);
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
            let app = App::open(load_config(&config)?, false).await?;
            let tools = app.dispatcher.list_tools(&Principal::local("local"));
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
            tenant,
            tool,
            arguments,
        } => {
            let arguments: serde_json::Value = serde_json::from_str(&arguments)
                .context("the arguments must be a JSON object, e.g. '{\"text\":\"hi\"}'")?;
            let app = App::open(load_config(&config)?, false).await?;
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
                    &Principal::local(&tenant),
                    CallRequest {
                        tool,
                        arguments,
                        events: EventSink::new(tx, Some(LogLevel::Debug), true),
                        cancel: Default::default(),
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
        Command::Inspect { file } => inspect(&file).await,
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let config = load_config(&config)?;
            println!(
                "configuration OK: {} tool component(s) configured, tools from {}",
                config.tools.len(),
                config.tools_dir().display()
            );
            Ok(ExitCode::SUCCESS)
        }
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

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let server = config.server.clone();
    if !server.listen.ip().is_loopback() {
        // Authentication is not available yet: never expose tools beyond
        // this machine without it.
        anyhow::bail!(
            "refusing to listen on {}: without authentication Cordon only listens on loopback (127.0.0.1 or ::1)",
            server.listen
        );
    }
    let app = App::open(config, true).await?;
    report_problems(&app);
    let tools = app
        .dispatcher
        .list_tools(&Principal::local(&server.local_tenant))
        .len();
    let listener = tokio::net::TcpListener::bind(server.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (server.listen / --listen)",
                server.listen
            )
        })?;
    // Cordon's own origin is always allowed (the port is known only now, with
    // --listen :0): a page served from elsewhere, or a rebinding attack that
    // carries a foreign Host, is still refused.
    let mut server = server;
    let port = listener.local_addr()?.port();
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        server.allowed_origins.push(format!("http://{host}:{port}"));
    }
    let shutdown = CancellationToken::new();
    let router = cordon::server::router(app.dispatcher.clone(), &server, shutdown.clone());
    let url = format!(
        "http://{}{}",
        listener.local_addr()?,
        cordon::server::MCP_PATH
    );
    tracing::warn!(
        "authentication is not configured: every local caller acts as tenant `{}`",
        server.local_tenant
    );
    tracing::info!(tools, %url, "serving MCP (Streamable HTTP at /mcp, HTTP+SSE at /sse); press Ctrl-C to stop");
    eprintln!(
        "\nCordon is serving {tools} tool(s) at {url}\n\
         Client configuration (Cursor, VS Code, Claude Code):\n  \
         {{\"mcpServers\": {{\"cordon\": {{\"type\": \"http\", \"url\": \"{url}\"}}}}}}\n\
         MCP Inspector: npx @modelcontextprotocol/inspector, transport \"Streamable HTTP\", URL {url}\n"
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    cordon::server::serve_on(listener, router, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
