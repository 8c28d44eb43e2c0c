//! Attach sessions: the client's streams joined to the container's own process through the
//! shim's attach socket (see `berth_shim::attach`).

use berth_runtime::Runtime;
use berth_shim::attach::{
    FRAME_RESIZE, FRAME_STDERR, FRAME_STDIN, FRAME_STDIN_CLOSE, FRAME_STDOUT, connect_attach,
    read_frame, write_frame,
};
use bytes::Bytes;
use tokio::sync::watch;

use crate::channel::InStream;
use crate::exec::{ExecIo, Outcome, SizeParser, finish};

/// Runs an attach to container `id` until its process ends or the client goes.
pub(crate) async fn run(runtime: &Runtime, id: &str, mut io: ExecIo, gone: watch::Receiver<bool>) {
    let outcome = match runtime.attach_target(id) {
        Ok(target) => match connect_attach(&target.bundle).await {
            Ok(sock) => pump(sock, &mut io, gone).await,
            Err(e) => Outcome::Failed(format!("cannot attach to container {id}: {e}")),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    };
    finish(io, outcome).await;
}

async fn pump(
    sock: tokio::net::UnixStream,
    io: &mut ExecIo,
    mut gone: watch::Receiver<bool>,
) -> Outcome {
    let (mut rd, mut wr) = sock.into_split();
    let (mut stdin, mut resize) = (io.stdin.take(), io.resize.take());
    let to_shim = tokio::spawn(async move {
        let mut sizes = SizeParser::default();
        while stdin.is_some() || resize.is_some() {
            tokio::select! {
                d = recv(&mut stdin) => {
                    let sent = match d {
                        Some(data) => write_frame(&mut wr, FRAME_STDIN, &data).await,
                        None => {
                            stdin = None;
                            write_frame(&mut wr, FRAME_STDIN_CLOSE, &[]).await
                        }
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                d = recv(&mut resize) => match d {
                    Some(data) => {
                        for (w, h) in sizes.push(&data) {
                            let mut size = [0u8; 4];
                            size[..2].copy_from_slice(&w.to_be_bytes());
                            size[2..].copy_from_slice(&h.to_be_bytes());
                            if write_frame(&mut wr, FRAME_RESIZE, &size).await.is_err() {
                                return;
                            }
                        }
                    }
                    None => resize = None,
                },
            }
        }
        // Keep our side open: the shim ends a client whose connection closes.
        std::future::pending::<()>().await;
        drop(wr);
    });
    loop {
        tokio::select! {
            f = read_frame(&mut rd) => {
                let (kind, data) = match f {
                    Ok(Some(frame)) => frame,
                    // The container is gone and its output drained.
                    Ok(None) | Err(_) => break,
                };
                let out = match kind {
                    FRAME_STDOUT => io.stdout.as_ref(),
                    FRAME_STDERR => io.stderr.as_ref(),
                    _ => None,
                };
                if let Some(out) = out
                    && out.write(Bytes::from(data)).await.is_err()
                {
                    break;
                }
            }
            _ = async { let _ = gone.wait_for(|g| *g).await; } => break,
        }
    }
    to_shim.abort();
    Outcome::Exited(0)
}

/// The next chunk of an input that is there; never resolves for one that is not.
async fn recv(input: &mut Option<InStream>) -> Option<Bytes> {
    match input {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
