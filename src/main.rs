//! The `channelgate` command: parse settings, start a node, stop it on SIGTERM or SIGINT.

use std::process::ExitCode;

use channelgate::Node;
use channelgate::config::{Options, Settings};
use channelgate::console::ConsoleAccess;
use channelgate::identity::sign_access_token;
use clap::Parser;

fn main() -> ExitCode {
    // clap prints --help, --version and usage errors itself, with the right exit code.
    let options = Options::parse();
    let settings = match options.with_file().and_then(Settings::resolve) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("channelgate: {message}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(workers) = settings.workers {
        runtime.worker_threads(workers);
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(serve(settings)),
        Err(error) => {
            eprintln!("channelgate: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a node until SIGTERM or SIGINT.
async fn serve(settings: Settings) -> ExitCode {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "channelgate=info".into()),
        )
        .with_writer(std::io::stderr);
    if settings.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let node = match Node::start(settings).await {
        Ok(node) => node,
        Err(error) => {
            eprintln!("channelgate: {error}");
            return ExitCode::FAILURE;
        }
    };
    warn_about_unsafe_settings(&node);
    if node.settings().dev {
        print_dev_banner(&node);
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    ExitCode::SUCCESS
}

fn warn_about_unsafe_settings(node: &Node) {
    let settings = node.settings();
    if settings.dev {
        tracing::warn!("DEVELOPMENT MODE (--dev): not for production");
    }
    if settings.api_key.is_none() {
        tracing::warn!("the gRPC API is open: no --api-key is set");
    }
    if settings.authorizer == channelgate::config::AuthorizerKind::Static {
        tracing::warn!(
            "static authorizer: every authenticated user may subscribe to every page; set --authorizer for production"
        );
    }
    match settings.console {
        ConsoleAccess::Open => tracing::warn!(
            "the console at http://{}/console/ is open to anyone who reaches the port (--dev)",
            node.ws_addr
        ),
        ConsoleAccess::Token(_) => tracing::info!(
            "console at http://{}/console/ (sign in with --console-token)",
            node.ws_addr
        ),
        ConsoleAccess::Off => {}
    }
    if settings.allowed_origins.is_none() {
        tracing::warn!("any browser Origin may open /ws/core/; set --allowed-origins to restrict");
    }
}

/// What a developer needs to try the node: a socket URL with a token, and a publish.
fn print_dev_banner(node: &Node) {
    let settings = node.settings();
    let token = sign_access_token(
        settings.jwt_secret.as_bytes(),
        &settings.jwt_user_id_claim,
        1,
        24 * 3600,
    )
    .unwrap_or_else(|e| format!("<cannot sign a token: {e}>"));
    if settings.console.is_on() {
        println!(
            "Console (open it in a browser):\n  http://{}/console/",
            node.ws_addr
        );
    }
    if settings.jwt_secret_generated {
        println!("JWT secret (generated):  {}", settings.jwt_secret);
    }
    println!("Sample token (user 1, valid 24 h):\n  {token}");
    println!(
        "WebSocket URL:\n  ws://{}/ws/core/?jwt_token={token}",
        node.ws_addr
    );
    println!("Subscribe by sending:  {{\"page\":\"table\",\"table_id\":1}}");
    println!(
        "Publish to table-1:\n  grpcurl -plaintext -d '{{\"group\":\"table-1\",\"payload\":\"{{\\\"type\\\":\\\"hello\\\"}}\"}}' {} channelgate.v1.Gateway/Publish",
        node.grpc_addr
    );
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
