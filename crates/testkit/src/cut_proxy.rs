//! A TCP proxy in front of PostgreSQL that loses the server's answer to one statement, as a
//! network failure right after a commit would: the connection whose client sends bytes that
//! contain an armed marker has those bytes delivered (the statement runs and commits), then
//! every answer of the server on it dropped, and the connection closed after a while. It can
//! also make the database unreachable for a time from that moment (every other connection
//! closed, new ones refused) while the client tries to learn what happened. Everything else
//! passes through.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a cut connection stays open, answers dropped, before it is closed: long enough
/// for the server to finish the statement it was sent.
const CUT_HOLD: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Plan {
    /// Cut the connection that sends these bytes (once).
    marker: Option<Vec<u8>>,
    /// From the cut, refuse new connections for this long.
    down_for: Duration,
    /// New connections are refused until then.
    down_until: Option<Instant>,
    cuts: usize,
    /// Bumped when the database becomes unreachable: every open connection closes.
    outage: Option<tokio::sync::watch::Sender<u64>>,
}

/// The proxy; it runs until the process ends.
pub struct CutProxy {
    addr: SocketAddr,
    /// The server's `host:port` as written in the URL the proxy was made for.
    upstream: String,
    plan: Arc<Mutex<Plan>>,
}

impl CutProxy {
    /// A proxy on a free loopback port, in front of the server of `server_url` (a PostgreSQL
    /// URL with a `host:port` or a `host` after the `@`).
    pub async fn start(server_url: &str) -> std::io::Result<Self> {
        let authority = server_url
            .split_once('@')
            .map_or(server_url, |(_, rest)| rest)
            .split(['/', '?'])
            .next()
            .unwrap_or_default()
            .to_owned();
        let upstream = if authority.contains(':') {
            authority.clone()
        } else {
            format!("{authority}:5432")
        };
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let plan = Arc::new(Mutex::new(Plan {
            outage: Some(tokio::sync::watch::channel(0).0),
            ..Plan::default()
        }));
        let shared = plan.clone();
        let target = upstream.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refused = lock(&shared)
                    .down_until
                    .is_some_and(|until| Instant::now() < until);
                if refused {
                    drop(client);
                    continue;
                }
                let (plan, target) = (shared.clone(), target.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        relay(client, server, plan).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            upstream: authority,
            plan,
        })
    }

    /// `url`, a URL of the proxied server, through this proxy, without TLS (the proxy reads
    /// what the client sends).
    pub fn url(&self, url: &str) -> String {
        let url = url.replacen(
            &format!("@{}", self.upstream),
            &format!("@{}", self.addr),
            1,
        );
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}sslmode=disable")
    }

    /// Arms a cut: the next connection to send `marker` loses the answers from then on, and
    /// new connections are refused for `down_for` from that moment.
    pub fn cut_after(&self, marker: &str, down_for: Duration) {
        let mut plan = lock(&self.plan);
        plan.marker = Some(marker.as_bytes().to_vec());
        plan.down_for = down_for;
    }

    /// How many connections were cut so far.
    pub fn cuts(&self) -> usize {
        lock(&self.plan).cuts
    }
}

fn lock(plan: &Mutex<Plan>) -> std::sync::MutexGuard<'_, Plan> {
    plan.lock().unwrap_or_else(|e| e.into_inner())
}

async fn relay(client: TcpStream, server: TcpStream, plan: Arc<Mutex<Plan>>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_in, mut client_out) = client.into_split();
    let (mut server_in, mut server_out) = server.into_split();
    let (cut_tx, mut cut_rx) = tokio::sync::watch::channel(false);
    let cut_seen = cut_tx.subscribe();
    let mut outage = match &lock(&plan).outage {
        Some(outage) => outage.subscribe(),
        None => return,
    };

    let upward = async move {
        let mut buf = vec![0u8; 64 * 1024];
        // The end of the previous read, so a marker split across reads is still seen.
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match client_in.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut seen = std::mem::take(&mut tail);
            seen.extend_from_slice(&buf[..n]);
            let cut = {
                let mut plan = lock(&plan);
                let hit = plan
                    .marker
                    .as_ref()
                    .is_some_and(|m| seen.windows(m.len()).any(|w| w == m.as_slice()));
                if hit {
                    plan.marker = None;
                    plan.cuts += 1;
                }
                hit
            };
            if cut {
                // Told to stop answering before the statement goes up, so no answer escapes.
                let _ = cut_tx.send(true);
                // Then, if asked, the database becomes unreachable for everyone else.
                let plan = lock(&plan);
                if !plan.down_for.is_zero() {
                    let mut plan = plan;
                    plan.down_until = Some(Instant::now() + plan.down_for);
                    if let Some(outage) = &plan.outage {
                        outage.send_modify(|n| *n += 1);
                    }
                }
            }
            if server_out.write_all(&buf[..n]).await.is_err() {
                return;
            }
            if cut {
                tokio::time::sleep(CUT_HOLD).await;
                return;
            }
            let keep = seen.len().min(256);
            tail = seen[seen.len() - keep..].to_vec();
        }
    };
    let downward = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                read = server_in.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if *cut_rx.borrow() {
                        continue;
                    }
                    if client_out.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                _ = cut_rx.changed() => {
                    if *cut_rx.borrow() {
                        // Answers from now on are dropped until the upward side closes.
                        tokio::time::sleep(CUT_HOLD).await;
                        return;
                    }
                }
            }
        }
    };
    // The cut connection itself stays open until its hold ends.
    let severed = async move {
        while outage.changed().await.is_ok() {
            if !*cut_seen.borrow() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    // Either side ending, or an outage, closes both connections (the halves drop here).
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
        _ = severed => {}
    }
}
