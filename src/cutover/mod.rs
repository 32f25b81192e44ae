//! `cutover` and `rollback`: move the application from the source to the
//! target with seconds of write freeze, prove that nothing was lost, and
//! keep a way back that loses nothing either.
//!
//! ```text
//!  preflight  copied, keys and indexes built, nothing rejected, roles,     reads only
//!             privileges, lag; --check stops here
//!  catch up   a marker through the stream, until its round trip is under --max-lag
//!  fence      its plan recorded in the target, then applied to the source ┐
//!  drain      a marker written after the fence; once the target records   │
//!             it, the target holds every write the source accepted       │ the write
//!  sequences  the target's set to the source's values                     │ freeze,
//!  verify     row counts (or checksums) at the fenced position            │ at most
//!  reverse    PG → PG: a slot and publication on the target, the old      │ --timeout
//!             source's state marked identical at the slot's start         │
//!  switch     recorded in the target; a stop marker ends forward          ┘
//!             replication where it is; its slot dropped; "safe to switch"
//! ```
//!
//! A failure before the switch, `--timeout`, SIGINT or SIGTERM lift the
//! fence and leave forward replication as it was; the record in the target
//! lets a cutover that was killed be undone (or, past the switch,
//! completed) by running the command again. Markers travel in the change
//! stream (see [`crate::model::Marker`]), so the same steps work whether a
//! daemon streams or cutover streams itself.

pub mod preflight;
pub mod record;
pub mod reverse;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::record::{
    last_record, Direction, Options, Outcome, Record, Status, Step, VerifyMode,
};
use self::record::{now, save};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::model::{Marker, TableSchema};
use crate::pipeline::{Mode, Pipeline, Report};
use crate::sink::{MarkerState, Sink};
use crate::source::{FenceMode, Source};

/// The least time cutover waits for the target to come within --max-lag
/// before it fences (longer when --timeout is).
const CATCH_UP_AT_LEAST: Duration = Duration::from_secs(30);

/// The daemon streaming, or the stream this process runs.
enum Stream {
    Daemon,
    Own {
        handle: tokio::task::JoinHandle<Result<Report>>,
        cancel: CancellationToken,
    },
}

impl Stream {
    /// Starts streaming in this process unless a daemon streams.
    async fn start(pipeline: &Arc<Pipeline>, source: &dyn Source) -> Result<Stream> {
        if source.stream_in_use().await? {
            info!("a running daemon streams: cutover writes markers into its stream");
            return Ok(Stream::Daemon);
        }
        info!("no daemon streams: cutover streams itself");
        let cancel = CancellationToken::new();
        let (p, c) = (pipeline.clone(), cancel.clone());
        let handle = tokio::spawn(async move { p.run(Mode::Run, c).await });
        Ok(Stream::Own { handle, cancel })
    }

    /// The stream this process runs has ended (with its error, if any).
    fn ended(&mut self) -> Option<String> {
        match self {
            Stream::Own { handle, .. } if handle.is_finished() => Some("the stream stopped".into()),
            _ => None,
        }
    }

    async fn stop(self) -> Option<Result<Report>> {
        match self {
            Stream::Daemon => None,
            Stream::Own { handle, cancel } => {
                cancel.cancel();
                match handle.await {
                    Ok(r) => Some(r),
                    Err(e) => Some(Err(Error::definite(format!("the stream failed: {e}")))),
                }
            }
        }
    }
}

/// Writes a marker and waits until the target records it; its record.
async fn through(
    source: &dyn Source,
    sink: &dyn Sink,
    stream: &mut Stream,
    marker: Marker,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<MarkerState> {
    source.mark(&marker).await?;
    loop {
        if let Some(m) = sink
            .state()
            .await?
            .and_then(|s| s.marker)
            .filter(|m| m.id == marker.id)
        {
            return Ok(m);
        }
        if let Some(why) = stream.ended() {
            return Err(Error::definite(format!(
                "{why} before marker {} reached the target",
                marker.id
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Transient,
                format!(
                    "marker {} did not reach the target in time (the target is behind)",
                    marker.id
                ),
            ));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(Error::new(ErrorKind::Interrupted, "interrupted (SIGINT/SIGTERM)")),
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
    }
}

/// The open sides of a cutover.
struct Sides {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    tables: Vec<Arc<TableSchema>>,
}

/// Runs a cutover (or, with `Direction::Rollback`, the rollback over the
/// reverse replica) of `config`'s replication.
pub async fn run(
    config: Arc<Config>,
    direction: Direction,
    opts: &Options,
    cancel: CancellationToken,
) -> Result<Outcome> {
    let id = format!(
        "{}-{}",
        match direction {
            Direction::Forward => "cutover",
            Direction::Rollback => "rollback",
        },
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    );
    let mut out = Outcome {
        id: id.clone(),
        direction,
        go: false,
        reasons: Vec::new(),
        switched: false,
        freeze_ms: None,
        lag_ms: None,
        steps: Vec::new(),
        reverse: None,
        error: None,
    };
    // Rollback: the reverse replica's direction, and the forward record.
    let (work, forward) = match direction {
        Direction::Forward => (config.clone(), None),
        Direction::Rollback => {
            let (c, f) = reverse::for_rollback(&config).await?;
            (c, Some(f))
        }
    };
    if !opts.check {
        preflight::release_embedded_target(&work).await?;
    }
    let pipeline = Arc::new(crate::connect::pipeline(&work).await?);
    let sides = Sides {
        config: work.clone(),
        source: pipeline.source(),
        sink: pipeline.sink(),
        tables: pipeline.tables().await?,
        pipeline,
    };
    if !opts.check {
        if let Some(done) = earlier(&sides, direction, &mut out).await? {
            return Ok(done);
        }
    }
    let started = Instant::now();
    let mut reasons = preflight::problems(
        &sides.config,
        &*sides.source,
        &*sides.sink,
        &sides.tables,
        opts,
        None,
    )
    .await?;
    if let Some(f) = &forward {
        reasons.extend(f.problems());
    }
    out.go = reasons.is_empty();
    out.reasons = reasons.clone();
    out.step(
        "preflight",
        started,
        out.go,
        if out.go { vec!["go".into()] } else { reasons },
    );
    if opts.check || !out.go {
        return Ok(out);
    }
    let mut record = Record {
        id: id.clone(),
        direction,
        status: Status::Fencing,
        started_at: now(),
        finished_at: None,
        fence: None,
        steps: Vec::new(),
        freeze_ms: None,
        position: None,
        tables: sides
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.target_name.clone()))
            .collect(),
        keys: reverse::key_columns(&sides.tables),
        reverse_slot: None,
        ended: false,
        error: None,
    };
    let mut stream = Stream::start(&sides.pipeline, &*sides.source).await?;
    let result = fenced(&sides, opts, &mut stream, &mut record, &mut out, &cancel).await;
    match result {
        Ok(()) => {}
        Err(e) => {
            let why = e.report();
            warn!(error = %why, "cutover failed: lifting the fence");
            out.error = Some(why.clone());
            undo(&sides, &mut record, &why, &mut out).await;
            record.steps = out.steps.clone();
            if let Err(e) = save(&*sides.sink, &record).await {
                warn!(error = %e.report(), "cannot record the undone cutover in the target");
            }
            if let Some(Err(e)) = stream.stop().await {
                warn!(error = %e.report(), "the stream cutover ran stopped with an error");
            }
            return Ok(out);
        }
    }
    // Switched: forward replication ends at a stop marker.
    finish(&sides, &mut stream, &mut record, &mut out).await;
    if let Some(f) = forward {
        let t = Instant::now();
        match f.restore(&id).await {
            Ok(detail) => out.step("old primary writable", t, true, detail),
            Err(e) => out.step("old primary writable", t, false, vec![e.report()]),
        }
    }
    if let Some(Err(e)) = stream.stop().await {
        warn!(error = %e.report(), "the stream cutover ran stopped with an error");
    }
    Ok(out)
}

/// An earlier cutover of this target: one that was interrupted is undone
/// (before the switch) or completed (after it); a switched one is done.
async fn earlier(
    sides: &Sides,
    direction: Direction,
    out: &mut Outcome,
) -> Result<Option<Outcome>> {
    let Some(mut r) = last_record(&*sides.sink).await? else {
        return Ok(None);
    };
    match r.status {
        Status::Fencing => {
            let t = Instant::now();
            let why = format!("cutover {} was interrupted before it switched", r.id);
            undo(sides, &mut r, &why, out).await;
            save(&*sides.sink, &r).await?;
            if let Some(s) = out.steps.last_mut() {
                s.step = "undo earlier".into();
            }
            info!(earlier = %r.id, ms = t.elapsed().as_millis() as u64, "an interrupted cutover was undone; starting again");
            Ok(None)
        }
        Status::Switched if r.direction == direction => {
            if !r.ended {
                let mut stream = Stream::Daemon;
                finish(sides, &mut stream, &mut r, out).await;
            }
            out.go = true;
            out.switched = true;
            out.freeze_ms = r.freeze_ms;
            out.id = r.id.clone();
            out.reasons.push(format!(
                "cutover {} switched already at {}",
                r.id,
                r.finished_at.as_deref().unwrap_or("?")
            ));
            Ok(Some(out.clone()))
        }
        _ => Ok(None),
    }
}

/// Fence to switch.
async fn fenced(
    sides: &Sides,
    opts: &Options,
    stream: &mut Stream,
    record: &mut Record,
    out: &mut Outcome,
    cancel: &CancellationToken,
) -> Result<()> {
    let (source, sink) = (&*sides.source, &*sides.sink);
    // Catch up: a marker's round trip under --max-lag.
    let t = Instant::now();
    let give_up = t + opts.timeout.max(CATCH_UP_AT_LEAST);
    let mut probe = 0;
    let lag = loop {
        probe += 1;
        let sent = Instant::now();
        let marker = Marker {
            id: format!("{}-lag-{probe}", record.id),
            stop: false,
        };
        match through(source, sink, stream, marker, give_up, cancel).await {
            Ok(_) => {
                let rt = sent.elapsed();
                if rt <= opts.max_lag {
                    break rt;
                }
                info!(lag_ms = rt.as_millis() as u64, "behind: waiting to catch up before the fence");
            }
            Err(e) if e.kind() == ErrorKind::Transient => {
                return Err(Error::definite(format!(
                    "the target never came within --max-lag {:?} of the source in {:?}; nothing was fenced",
                    opts.max_lag,
                    opts.timeout.max(CATCH_UP_AT_LEAST)
                )))
            }
            Err(e) => return Err(e),
        }
    };
    out.lag_ms = Some(lag.as_millis() as u64);
    out.step(
        "catch up",
        t,
        true,
        vec![format!(
            "lag {} ms (a marker's round trip)",
            lag.as_millis()
        )],
    );

    // Fence: recorded before it goes up.
    let t = Instant::now();
    let fence = source
        .plan_fence(opts.fence, opts.roles.as_deref(), &sides.tables)
        .await?;
    record.fence = Some(fence.clone());
    save(sink, record).await?;
    let freeze = Instant::now();
    let deadline = freeze + opts.timeout;
    let mut detail = fence.summary.clone();
    detail.extend(source.apply_fence(&fence).await?);
    out.step("fence", t, true, detail);

    // Drain.
    let t = Instant::now();
    let drained = through(
        source,
        sink,
        stream,
        Marker {
            id: format!("{}-drain", record.id),
            stop: false,
        },
        deadline,
        cancel,
    )
    .await
    .map_err(|e| timed_out(e, "drain", opts))?;
    let kind = source.position_kind();
    let mut detail = vec![format!(
        "the target holds every write up to {}",
        drained.position.show(kind)
    )];
    if opts.fence == FenceMode::None {
        // No fence: nothing may arrive in a quiet second.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let quiet = through(
            source,
            sink,
            stream,
            Marker {
                id: format!("{}-quiet", record.id),
                stop: false,
            },
            deadline,
            cancel,
        )
        .await
        .map_err(|e| timed_out(e, "drain", opts))?;
        if quiet.applied != drained.applied {
            return Err(Error::definite(format!(
                "--fence none: {} change(s) arrived after the drain; the application still writes. Stop its writers, or use --fence read-only",
                quiet.applied.saturating_sub(drained.applied)
            )));
        }
        detail.push("no change arrived in a quiet second".into());
    }
    record.position = Some(drained.position.show(kind));
    out.step("drain", t, true, detail);

    // Sequences.
    let t = Instant::now();
    let sequences = source.sequences(&sides.tables).await?;
    let detail = sink.set_sequences(&sides.tables, &sequences).await?;
    out.step("sequences", t, true, detail);
    check_time(deadline, "sequences", opts)?;

    // Verify.
    let t = Instant::now();
    let detail = verify(sides, opts.verify).await?;
    out.step("verify", t, true, detail);
    check_time(deadline, "verify", opts)?;

    // Reverse replica.
    if opts.reverse {
        let t = Instant::now();
        let (slot, detail) = reverse::prepare(&sides.config, &sides.tables).await?;
        record.reverse_slot = Some(slot);
        out.step("reverse replica", t, true, detail);
        check_time(deadline, "reverse replica", opts)?;
    }

    // Switch.
    let t = Instant::now();
    record.status = Status::Switched;
    record.finished_at = Some(now());
    record.freeze_ms = Some(freeze.elapsed().as_millis() as u64);
    record.steps = out.steps.clone();
    save(sink, record).await?;
    out.switched = true;
    out.freeze_ms = record.freeze_ms;
    out.step(
        "switch",
        t,
        true,
        vec![format!(
            "safe to switch: the write freeze lasted {} ms",
            record.freeze_ms.unwrap_or(0)
        )],
    );
    if record.reverse_slot.is_some() {
        out.reverse = Some("switchyard run --reverse --config <this config>".into());
    }
    Ok(())
}

fn timed_out(e: Error, step: &str, opts: &Options) -> Error {
    if e.kind() == ErrorKind::Transient {
        Error::definite(format!(
            "{step}: the write freeze reached --timeout {:?} ({})",
            opts.timeout, e
        ))
    } else {
        e
    }
}

fn check_time(deadline: Instant, step: &str, opts: &Options) -> Result<()> {
    if Instant::now() > deadline {
        return Err(Error::definite(format!(
            "{step}: the write freeze passed --timeout {:?}",
            opts.timeout
        )));
    }
    Ok(())
}

/// The target equals the fenced source: counts or checksums.
async fn verify(sides: &Sides, mode: VerifyMode) -> Result<Vec<String>> {
    match mode {
        VerifyMode::None => Ok(vec!["not verified (--verify none)".into()]),
        VerifyMode::Counts => {
            let mut differ = Vec::new();
            let mut rows = 0;
            for t in &sides.tables {
                let (s, d) = (
                    sides.source.exact_count(t).await?,
                    sides.sink.count(t).await?,
                );
                rows += s;
                if s != d {
                    differ.push(format!("{}: source {s} rows, target {d}", t.name));
                }
            }
            if !differ.is_empty() {
                return Err(Error::definite(format!(
                    "the target differs from the fenced source: {}",
                    differ.join("; ")
                )));
            }
            Ok(vec![format!(
                "{} tables, {rows} rows: the same counts on both sides",
                sides.tables.len()
            )])
        }
        VerifyMode::Full => {
            let options = crate::verify::Options {
                tables: Vec::new(),
                wait: Some(Duration::from_secs(5)),
                batch_rows: sides.config.pipeline.snapshot_batch_rows.max(1),
            };
            let v =
                crate::verify::verify(sides.source.clone(), sides.sink.clone(), &options).await?;
            if !v.identical {
                let differ: Vec<String> = v
                    .tables
                    .iter()
                    .filter(|t| !t.identical)
                    .map(|t| format!("{}: {} difference(s)", t.table, t.differences_found))
                    .collect();
                return Err(Error::definite(format!(
                    "the target differs from the fenced source: {}",
                    differ.join("; ")
                )));
            }
            Ok(vec![format!(
                "{} tables identical, row by row",
                v.tables.len()
            )])
        }
    }
}

/// Lifts the fence of `record` (and drops a reverse slot it made).
async fn undo(sides: &Sides, record: &mut Record, why: &str, out: &mut Outcome) {
    let t = Instant::now();
    let mut detail = Vec::new();
    let mut ok = true;
    if let Some(fence) = &record.fence {
        let mut lifted = false;
        for attempt in 0..5 {
            match sides.source.lift_fence(fence).await {
                Ok(()) => {
                    lifted = true;
                    break;
                }
                Err(e) => {
                    warn!(error = %e.report(), attempt, "lifting the fence failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if lifted {
            detail.push("the fence is lifted: the source takes writes again".into());
        } else {
            ok = false;
            detail.push(format!(
                "THE FENCE COULD NOT BE LIFTED; undo it by hand: {}",
                fence.summary.join("; ")
            ));
        }
    }
    if let Some(slot) = record.reverse_slot.take() {
        match reverse::discard(&sides.config, &slot).await {
            Ok(d) => detail.extend(d),
            Err(e) => detail.push(format!(
                "the reverse slot {slot:?} on the target could not be dropped: {}",
                e.report()
            )),
        }
    }
    record.status = Status::Undone;
    record.finished_at = Some(now());
    record.error = Some(why.to_string());
    out.step("undo", t, ok, detail);
}

/// After the switch: a stop marker ends forward replication where it is,
/// and what it holds in the source is released.
async fn finish(sides: &Sides, stream: &mut Stream, record: &mut Record, out: &mut Outcome) {
    let t = Instant::now();
    let mut detail = Vec::new();
    let stop = Marker {
        id: format!("{}-stop", record.id),
        stop: true,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    match through(
        &*sides.source,
        &*sides.sink,
        stream,
        stop,
        deadline,
        &CancellationToken::new(),
    )
    .await
    {
        Ok(_) => detail.push("forward replication stopped at the stop marker".into()),
        // A daemon may be gone already (its stream ends nowhere else).
        Err(e) => detail.push(format!("the stop marker was not recorded: {}", e.report())),
    }
    match sides.source.end_replication().await {
        Ok(d) => detail.extend(d),
        Err(e) => detail.push(format!(
            "forward replication's slot could not be dropped: {}",
            e.report()
        )),
    }
    record.ended = true;
    if let Err(e) = save(&*sides.sink, record).await {
        detail.push(format!(
            "cannot record the end of forward replication: {}",
            e.report()
        ));
    }
    out.step("forward replication ended", t, true, detail);
}
