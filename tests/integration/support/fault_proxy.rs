//! A TCP proxy in front of a real server, for cutting one client's link on purpose: pass bytes
//! through, black-hole them (connections stay open, nothing arrives until the link is back: a
//! silent partition), reset
//! every connection (and refuse new ones), or delay every chunk. Used between a quotad process
//! and its Redis, so that only that replica loses Redis while the others keep it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Pass,
    Blackhole,
    Reset,
    Delay(Duration),
}

pub struct FaultProxy {
    pub port: u16,
    /// The link's state: 0 pass, 1 blackhole, 2 reset, 3 + ms: delay.
    state: Arc<AtomicU64>,
    /// Bumped by every reset: connections of an older generation close.
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free loopback port, passing to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let (s, g) = (state.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if s.load(Ordering::Acquire) == 2 {
                    drop(client); // refused while reset
                    continue;
                }
                let (s, g) = (s.clone(), g.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let born = g.load(Ordering::Acquire);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pump(cr, sw, s.clone(), g.clone(), born));
                    let down = tokio::spawn(pump(sr, cw, s, g, born));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        FaultProxy {
            port,
            state,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, link: Link) {
        let value = match link {
            Link::Pass => 0,
            Link::Blackhole => 1,
            Link::Reset => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                2
            }
            Link::Delay(by) => 3 + by.as_millis() as u64,
        };
        self.state.store(value, Ordering::Release);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a connection as the link's state says, until either side closes or
/// a reset ends the connection's generation.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await;
        if generation.load(Ordering::Acquire) != born {
            return; // reset: both halves drop, the peers see the connection close
        }
        let n = match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        // Black-holed: held, as TCP holds unacknowledged bytes and retransmits them once the
        // path is back (or the connection is reset first).
        while state.load(Ordering::Acquire) == 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if generation.load(Ordering::Acquire) != born {
            return;
        }
        match state.load(Ordering::Acquire) {
            2 => return,
            delay @ 3.. => {
                tokio::time::sleep(Duration::from_millis(delay - 3)).await;
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
