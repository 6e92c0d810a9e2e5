//! The `pollmux` binary: parses arguments, sets up logging and the TLS crypto provider, loads
//! the configuration, and hands it to `pollmux::run`. Exit codes: 0 ok, 1 runtime failure,
//! 2 usage error, 78 (EX_CONFIG) invalid configuration.

use std::ffi::c_char;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use pollmux::config::{Config, DEFAULT_CONFIG};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// jemalloc keeps far less of hyper's idle per-connection buffers resident than glibc's malloc
/// (docs/BENCHMARKS.md): memory per held poll is the figure that sizes a deployment.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`). Freed pages are given back to the
/// kernel over one second (`dirty_decay_ms`; jemalloc's default is 10 s) and at once as
/// `MADV_DONTNEED`, not as `MADV_FREE` pages that still count as resident (`muzzy_decay_ms`:
/// 0). Without `background_thread`, jemalloc purges only while the process allocates: an idle
/// gateway, its clients gone, kept every page they had used. `_RJEM_MALLOC_CONF` in the
/// environment overrides any of these (docs/operations.md).
const ALLOCATOR_OPTIONS: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// [`ALLOCATOR_OPTIONS`] as the C string jemalloc reads.
static ALLOCATOR_CONF: [c_char; ALLOCATOR_OPTIONS.len()] = c_chars(ALLOCATOR_OPTIONS);

// SAFETY: `_rjem_malloc_conf` is the `malloc_conf` of tikv-jemalloc-sys's (prefixed) jemalloc,
// declared there as `Option<&'static c_char>`: a pointer to a NUL-terminated string that jemalloc
// only reads, once, when it initializes. This static has that type and points at a 'static
// string ending in NUL; nothing else in the process defines the symbol.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&c_char> = Some(&ALLOCATOR_CONF[0]);

const fn c_chars<const N: usize>(text: &[u8]) -> [c_char; N] {
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = text[i] as c_char;
        i += 1;
    }
    out
}

/// `EX_CONFIG` from sysexits.h: the configuration is invalid.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "pollmux",
    version,
    about = "A long-polling gateway: one upstream subscription per topic, fanned out to every waiting client"
)]
struct Cli {
    /// Log filter (e.g. "info", "pollmux=debug"); RUST_LOG wins when set.
    #[arg(long, global = true, env = "POLLMUX_LOG", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, env = "POLLMUX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Without a subcommand: `run`.
    #[command(subcommand)]
    command: Option<Command>,
    /// `pollmux --config FILE` is `pollmux run --config FILE`, as the synopsis `pollmux [run]`
    /// says.
    #[command(flatten)]
    run: RunArgs,
}

/// The arguments of `run`, also accepted without the subcommand.
#[derive(clap::Args)]
struct RunArgs {
    /// The configuration file (default: the embedded default configuration).
    #[arg(short, long, env = "POLLMUX_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve; without --config, the embedded default configuration.
    Run(RunArgs),
    /// Validate a configuration (including TLS files) without binding sockets.
    Check {
        #[arg(short, long, env = "POLLMUX_CONFIG")]
        config: PathBuf,
    },
    /// Ask a running pollmux whether it serves: GET /healthz on its admin listener; exit 0 on
    /// 200, else 1. For container health checks (no curl needed).
    Health {
        /// The configuration whose admin listener to ask (default: the embedded one's).
        #[arg(short, long, env = "POLLMUX_CONFIG", conflicts_with = "address")]
        config: Option<PathBuf>,
        /// The admin listener's address, e.g. 127.0.0.1:9090.
        #[arg(long)]
        address: Option<SocketAddr>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the embedded default configuration.
    PrintDefaultConfig,
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    // Global flags may come before a subcommand; a run option may not (which would it be for?).
    let config_given = matches.value_source("config") == Some(ValueSource::CommandLine);
    if matches.subcommand().is_some() && config_given {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--config before a subcommand: give it after the subcommand",
            )
            .exit();
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli);
    // Every TLS config names aws-lc-rs explicitly; installing it as the process default too keeps
    // any library that asks for the default on the same single provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command.unwrap_or(Command::Run(cli.run)) {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("pollmux {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Health {
            config,
            address,
            timeout,
        } => {
            let address = match (address, config) {
                (Some(a), _) => a,
                (None, path) => {
                    let loaded = match &path {
                        Some(p) => Config::from_file(p),
                        None => Ok(Config::default_config()),
                    };
                    match loaded {
                        Ok(c) => c.admin.address,
                        Err(errors) => {
                            let name = path.map(|p| p.display().to_string()).unwrap_or_default();
                            eprint!("{name}: {errors}");
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    }
                }
            };
            health(address, timeout)
        }
        Command::Check { config } => match Config::from_file(&config) {
            Ok(checked) => {
                // Under this process's descriptor limit, which `run` from the same shell gets.
                let fd_limit = pollmux::raise_fd_limit();
                let max = checked.limits.max_connections;
                if let (_, Some(warning)) = pollmux::public_connections(max, fd_limit) {
                    eprintln!("warning: {warning}");
                }
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{}: {errors}", config.display());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run(RunArgs { config }) => {
            let loaded = match &config {
                Some(path) => Config::from_file(path),
                None => Ok(Config::default_config()),
            };
            match loaded {
                Ok(loaded) => serve(loaded, config),
                Err(errors) => {
                    let name = config.map(|p| p.display().to_string()).unwrap_or_default();
                    eprint!("{name}: {errors}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// Exit 0 when the admin listener at `address` answers `/healthz` with 200.
fn health(address: SocketAddr, timeout: Duration) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(pollmux::admin::probe(address, "/healthz", timeout)) {
        Ok(status) if status == 200 => {
            println!("healthy");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("unhealthy: /healthz answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime `builder` makes, or `None` (said on stderr).
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            None
        }
    }
}

fn serve(config: Config, path: Option<PathBuf>) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        match pollmux::run(config, path, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits the process at once.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        let _ = first_tx.send(());
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    });
    Ok(async move {
        let _ = first_rx.await;
    })
}

fn init_logging(cli: &Cli) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: journald, container logs and files get text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options jemalloc parsed at its start in this binary: the symbol is the one it reads,
    /// and the background threads that purge while the gateway is idle run.
    #[test]
    fn the_allocator_gives_idle_memory_back() {
        assert_eq!(ALLOCATOR_OPTIONS.last(), Some(&0), "a C string");
        assert_eq!(tikv_jemalloc_ctl::opt::background_thread::read(), Ok(true));
        assert_eq!(tikv_jemalloc_ctl::background_thread::read(), Ok(true));
        // SAFETY: both options are `ssize_t` in jemalloc, `isize` here.
        let (dirty, muzzy) = unsafe {
            (
                tikv_jemalloc_ctl::raw::read::<isize>(b"opt.dirty_decay_ms\0"),
                tikv_jemalloc_ctl::raw::read::<isize>(b"opt.muzzy_decay_ms\0"),
            )
        };
        assert_eq!((dirty, muzzy), (Ok(1000), Ok(0)));
    }
}
