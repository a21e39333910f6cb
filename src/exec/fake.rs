//! A scripted, in-process backend for unit tests of the dispatcher: each node "agent" is a
//! tokio task that answers the protocol like the real one (Hello, Port, Started, Output,
//! Exited, Done), with behaviour chosen per unit: print lines, exit with a status after a
//! delay, ignore SIGTERM; per node: refuse the connection, or go silent (a lost link).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use crate::exec::backend::{Backend, EventTx, Link, LinkEvent};
use crate::exec::proto::{ExitStatus, FromAgent, Stream, ToAgent};

#[derive(Debug, Clone, Default)]
pub struct FakeUnit {
    pub lines: Vec<String>,
    /// Exit on its own after this long; None: run until stopped.
    pub exit: Option<(Duration, ExitStatus)>,
    /// Needs SIGKILL: a SIGTERM does nothing.
    pub ignores_term: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FakeNode {
    pub connect_error: Option<String>,
    /// Behaviour of unit i (units beyond the list run until stopped).
    pub units: Vec<FakeUnit>,
    /// Stop sending anything (heartbeats included) this long after Start: a lost host.
    pub silent_after: Option<Duration>,
    /// Messages sent this long after Start (rank states, an agent stopping on its own).
    pub script: Vec<(Duration, FromAgent)>,
}

#[derive(Default)]
pub struct FakeBackend {
    pub nodes: Vec<FakeNode>,
    /// Every command each node received, in order.
    pub received: Arc<Mutex<Vec<(usize, ToAgent)>>>,
}

enum Cmd {
    Msg(ToAgent),
    Close,
    Abandon,
}

struct FakeLink(UnboundedSender<Cmd>);

impl Link for FakeLink {
    fn send(&self, msg: &ToAgent) {
        let _ = self.0.send(Cmd::Msg(msg.clone()));
    }
    fn close(&self) {
        let _ = self.0.send(Cmd::Close);
    }
    fn abandon(&self) {
        let _ = self.0.send(Cmd::Abandon);
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn open(&self, node: usize, events: EventTx) -> Box<dyn Link> {
        let (tx, rx) = unbounded_channel();
        let spec = self.nodes.get(node).cloned().unwrap_or_default();
        tokio::spawn(simulate(node, spec, rx, events, self.received.clone()));
        Box::new(FakeLink(tx))
    }
}

struct Running {
    exit_at: Option<(Instant, ExitStatus)>,
    ignores_term: bool,
    done: bool,
}

async fn simulate(
    node: usize,
    spec: FakeNode,
    mut rx: UnboundedReceiver<Cmd>,
    events: EventTx,
    received: Arc<Mutex<Vec<(usize, ToAgent)>>>,
) {
    let send = |m: FromAgent| {
        let events = events.clone();
        async move { events.send((node, LinkEvent::Msg(m))).await.is_ok() }
    };
    if let Some(error) = spec.connect_error.clone() {
        let _ = events.send((node, LinkEvent::Closed { status: None, error: Some(error) })).await;
        return;
    }
    send(FromAgent::Hello {
        protocol: crate::exec::proto::PROTOCOL,
        version: "fake".into(),
        pid: 1000 + node as u32,
        hostname: format!("fake{node}"),
    })
    .await;
    let mut heartbeat: Option<Duration> = None;
    let mut next_beat = Instant::now();
    let mut units: Vec<Running> = Vec::new();
    let mut started = false;
    let mut silent_at: Option<Instant> = None;
    let mut eof = false;
    let mut script: Vec<(Instant, FromAgent)> = Vec::new();
    loop {
        let now = Instant::now();
        let silent = silent_at.is_some_and(|t| now >= t);
        let mut wake = now + Duration::from_secs(3600);
        if heartbeat.is_some() && !silent {
            wake = wake.min(next_beat);
        }
        for u in units.iter().filter(|u| !u.done) {
            if let Some((t, _)) = u.exit_at {
                wake = wake.min(t);
            }
        }
        if let Some((t, _)) = script.first() {
            wake = wake.min(*t);
        }
        tokio::select! {
            cmd = rx.recv(), if !eof => match cmd {
                None | Some(Cmd::Close) => {
                    eof = true;
                    if !started { return finish(node, &events, silent).await; }
                    stop(&mut units, Duration::from_millis(100));
                }
                Some(Cmd::Abandon) => return,
                Some(Cmd::Msg(m)) => {
                    received.lock().unwrap_or_else(|e| e.into_inner()).push((node, m.clone()));
                    if silent { continue; }
                    match m {
                        ToAgent::Init { heartbeat_ms, .. } => {
                            heartbeat = (heartbeat_ms > 0).then(|| Duration::from_millis(heartbeat_ms));
                        }
                        ToAgent::PickPort => { send(FromAgent::Port { port: 40000 + node as u16 }).await; }
                        ToAgent::Start { units: specs, .. } => {
                            started = true;
                            silent_at = spec.silent_after.map(|d| Instant::now() + d);
                            script = spec.script.iter().map(|(d, m)| (Instant::now() + *d, m.clone())).collect();
                            script.sort_by_key(|(t, _)| *t);
                            for (i, _) in specs.iter().enumerate() {
                                let b = spec.units.get(i).cloned().unwrap_or_default();
                                send(FromAgent::Started { unit: i as u32, pid: 2000 + i as u32 }).await;
                                if !b.lines.is_empty() {
                                    let mut data = b.lines.join("\n").into_bytes();
                                    data.push(b'\n');
                                    send(FromAgent::Output { unit: i as u32, stream: Stream::Stdout, data }).await;
                                }
                                units.push(Running {
                                    exit_at: b.exit.map(|(d, s)| (Instant::now() + d, s)),
                                    ignores_term: b.ignores_term,
                                    done: false,
                                });
                            }
                        }
                        ToAgent::Stop { grace_ms } => stop(&mut units, Duration::from_millis(grace_ms)),
                        ToAgent::Kill => {
                            for u in units.iter_mut().filter(|u| !u.done) {
                                u.exit_at = Some((Instant::now(), ExitStatus::signal(9)));
                            }
                        }
                        ToAgent::Heartbeat => {}
                    }
                }
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        let silent = silent_at.is_some_and(|t| now >= t);
        if let Some(h) = heartbeat {
            if now >= next_beat && !silent {
                send(FromAgent::Heartbeat).await;
                next_beat = now + h;
            }
        }
        while script.first().is_some_and(|(t, _)| now >= *t) {
            let (_, m) = script.remove(0);
            if !silent {
                send(m).await;
            }
        }
        for (i, u) in units.iter_mut().enumerate() {
            if let (false, Some((t, status))) = (u.done, u.exit_at) {
                if now >= t {
                    u.done = true;
                    if !silent {
                        send(FromAgent::Exited { unit: i as u32, status }).await;
                    }
                }
            }
        }
        if started && units.iter().all(|u| u.done) && !silent {
            return finish(node, &events, false).await;
        }
    }
}

fn stop(units: &mut [Running], grace: Duration) {
    let now = Instant::now();
    for u in units.iter_mut().filter(|u| !u.done) {
        let at = if u.ignores_term { now + grace } else { now };
        let status = if u.ignores_term { ExitStatus::signal(9) } else { ExitStatus::signal(15) };
        if u.exit_at.is_none_or(|(t, _)| t > at) {
            u.exit_at = Some((at, status));
        }
    }
}

async fn finish(node: usize, events: &EventTx, silent: bool) {
    if !silent {
        let _ = events.send((node, LinkEvent::Msg(FromAgent::Done))).await;
    }
    let _ = events.send((node, LinkEvent::Closed { status: Some(ExitStatus::code(0)), error: None })).await;
}
