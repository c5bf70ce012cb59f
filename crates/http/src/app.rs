//! Start-up: `Application::build` wires the pools, the ledger, the providers and the
//! background jobs, binds its own listener (port 0 works in tests) and returns; running is a
//! separate step, so tests can learn the port first.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use credit_domain::ports::{PaymentProvider, VideoProvider};
use credit_store::{Database, DbConfig, Ledger, Projector};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::JwtKeys;
use crate::config::Config;
use crate::error::{json_error, path_error, query_error};
use crate::health::Readiness;
use crate::state::AppState;

pub struct Application {
    port: u16,
    readiness: Readiness,
    server: Server,
    state: web::Data<AppState>,
    shutdown: watch::Sender<bool>,
    jobs: Vec<JoinHandle<()>>,
}

impl Application {
    pub async fn build(mut config: Config) -> anyhow::Result<Self> {
        for feature in config.demo_features() {
            tracing::warn!("DEMO MODE: {feature}");
        }
        if config.is_demo() {
            // The auditor's pages are part of the demo. Like the demo sign-in secret, this
            // token is made per process and dies with it; it is no real credential, so it
            // may be shown (it is the only way to learn it).
            let token = crate::auth::random_secret();
            tracing::warn!("DEMO MODE: admin token {token} (per process; ADMIN_TOKEN unset)");
            config.admin_token = Some(secrecy::SecretString::from(token));
        }
        crate::metrics::install();
        if config.database_url.contains(":6543/") {
            tracing::warn!(
                "DATABASE_URL names port 6543, Supabase's transaction-mode pooler: prepared \
                 statements, the migrations' advisory lock and LISTEN/NOTIFY do not work \
                 through it; use the direct connection or the session pooler (port 5432)"
            );
        }
        let mut db_config = DbConfig::new(config.database_url.clone());
        db_config.write_connections = config.write_connections;
        db_config.read_connections = config.read_connections;
        let db = Database::connect_and_migrate(&db_config).await?;
        let ledger = Arc::new(Ledger::new(db.write.clone()));

        let payments: Option<Arc<dyn PaymentProvider>> = match &config.stripe {
            Some(s) => Some(Arc::new(
                credit_stripe::StripeCheckout::new(
                    credit_stripe::StripeConfig::new(s.secret_key.clone())
                        .with_api_base(s.api_base.clone()),
                )
                .context("STRIPE_SECRET_KEY / STRIPE_API_BASE")?,
            )),
            None => None,
        };
        let video: Arc<dyn VideoProvider> = match &config.grsai {
            Some(g) => {
                let mut grsai =
                    credit_grsai::GrsaiConfig::new(g.api_base.clone(), g.api_key.clone());
                grsai.timeout = g.timeout;
                Arc::new(
                    credit_grsai::GrsaiClient::new(grsai)
                        .context("GRSAI_API_KEY / GRSAI_API_BASE")?,
                )
            }
            None => Arc::new(
                credit_grsai::SimulatedVideoProvider::new().with_delay(config.demo_video_delay),
            ),
        };
        let (jwt, demo_auth) = match JwtKeys::from_config(&config)? {
            Some(keys) => {
                keys.prefetch().await;
                (keys, false)
            }
            None => (JwtKeys::random(), true),
        };

        let listener = TcpListener::bind(config.listen_addr)
            .with_context(|| format!("binding LISTEN_ADDR {}", config.listen_addr))?;
        let port = listener.local_addr()?.port();
        // With port 0 the real port is known only now.
        if config.public_base_url.ends_with(":0") {
            config.public_base_url = format!("http://{}:{port}", config.listen_addr.ip());
            config.stripe_success_url = format!("{}/?recharge=success", config.public_base_url);
            config.stripe_cancel_url = format!("{}/?recharge=cancel", config.public_base_url);
        }

        let projector = Projector::new(db.read.clone(), ledger.appended());
        let state = web::Data::new(AppState {
            config,
            db: db.clone(),
            ledger: ledger.clone(),
            payments,
            video,
            jwt,
            demo_auth,
        });

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut jobs = vec![tokio::spawn(projector.run(shutdown_rx.clone()))];
        jobs.push(tokio::spawn(crate::settlement::run(
            state.clone(),
            shutdown_rx,
        )));

        let readiness = Readiness::default();
        let server_readiness = web::Data::new(readiness.clone());
        let limiter = web::Data::new(crate::limits::RateLimiter::default());
        let server_state = state.clone();
        let server = HttpServer::new(move || {
            let cors = cors(&server_state.config.cors_allowed_origins);
            App::new()
                .wrap(actix_web::middleware::from_fn(
                    crate::methods::method_not_allowed,
                ))
                .wrap(actix_web::middleware::from_fn(crate::limits::rate_limits))
                .wrap(cors)
                .wrap(tracing_actix_web::TracingLogger::<
                    crate::telemetry::RedactingSpans,
                >::new())
                .wrap(actix_web::middleware::from_fn(crate::metrics::http_metrics))
                // Outermost: the id exists before the span opens and reaches every answer.
                .wrap(actix_web::middleware::from_fn(
                    crate::telemetry::request_ids,
                ))
                .app_data(server_state.clone())
                .app_data(server_readiness.clone())
                .app_data(limiter.clone())
                .app_data(
                    web::JsonConfig::default()
                        .limit(64 * 1024)
                        .error_handler(|e, _| json_error(e).into()),
                )
                .app_data(web::QueryConfig::default().error_handler(|e, _| query_error(e).into()))
                .app_data(web::PathConfig::default().error_handler(|e, _| path_error(e).into()))
                .route("/metrics", web::get().to(crate::metrics::scrape))
                .configure(crate::routes::configure)
        })
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(10)
        .run();
        tracing::info!(listen.addr = %state.config.listen_addr, listen.port = port, "credit-ledger listening");

        Ok(Self {
            port,
            readiness,
            server,
            state,
            shutdown,
            jobs,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until Ctrl-C / SIGTERM; then stops accepting, drains requests and jobs.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        shutdown_signal().await;
        // Not ready first, so the load balancer stops sending requests; then drain.
        self.readiness.start_draining();
        tracing::info!(delay = ?self.state.config.shutdown_delay, "shutting down: /readyz answers 503, draining after the delay");
        tokio::time::sleep(self.state.config.shutdown_delay).await;
        handle.stop(true).await;
        let _ = server.await;
        let _ = self.shutdown.send(true);
        for job in self.jobs {
            let _ = job.await;
        }
        self.state.db.write.close().await;
        Ok(())
    }

    /// Runs in the background (tests); the returned handle stops everything when dropped
    /// by aborting the server task.
    pub fn spawn(self) -> RunningApp {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        RunningApp {
            port: self.port,
            readiness: self.readiness,
            handle,
            server,
            shutdown: self.shutdown,
            jobs: self.jobs,
        }
    }
}

/// An application running in the background.
pub struct RunningApp {
    pub port: u16,
    /// Turns `/readyz` to 503 as SIGTERM does.
    pub readiness: Readiness,
    handle: actix_web::dev::ServerHandle,
    server: JoinHandle<std::io::Result<()>>,
    shutdown: watch::Sender<bool>,
    jobs: Vec<JoinHandle<()>>,
}

impl RunningApp {
    pub async fn stop(self) {
        self.handle.stop(false).await;
        let _ = self.server.await;
        let _ = self.shutdown.send(true);
        for job in self.jobs {
            let _ = job.await;
        }
    }
}

fn cors(origins: &[String]) -> actix_cors::Cors {
    let mut cors = actix_cors::Cors::default()
        .allowed_methods(vec!["GET", "POST"])
        .allowed_headers(vec![
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::CONTENT_TYPE,
        ])
        .allowed_header("Idempotency-Key")
        .allowed_header("X-Request-Id")
        .expose_headers(vec!["X-Request-Id"])
        .max_age(3600);
    for origin in origins {
        cors = if origin == "*" {
            cors.allow_any_origin()
        } else {
            cors.allowed_origin(origin)
        };
    }
    cors
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
