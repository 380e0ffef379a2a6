//! The kernel programs' log (aya-log): their rare events (`tunnelmesh_common::events`) read from
//! each component's ring buffer and written to the daemon's log, tagged with the component.

use std::{
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::Ebpf;
use aya_log::EbpfLogger;

use super::FastpathError;
use crate::sys::poll;

/// Writes the kernel's records to the daemon's log (`tracing`), with the component that wrote them.
pub struct ToTracing(pub &'static str);

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let component = self.0;
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "tunnelmesh::ebpf", component, "{message}"),
            log::Level::Warn => tracing::warn!(target: "tunnelmesh::ebpf", component, "{message}"),
            log::Level::Info => tracing::info!(target: "tunnelmesh::ebpf", component, "{message}"),
            log::Level::Debug => tracing::debug!(target: "tunnelmesh::ebpf", component, "{message}"),
            log::Level::Trace => tracing::trace!(target: "tunnelmesh::ebpf", component, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Take the log ring out of a loaded object. Before its programs load: they refer to the ring,
/// which must stay open as long as they run.
pub fn take<L: log::Log>(ebpf: &mut Ebpf, logger: L) -> Result<EbpfLogger<L>, FastpathError> {
    EbpfLogger::init_with_logger(ebpf, logger).map_err(|e| FastpathError::Log(e.to_string()))
}

/// A thread that drains one component's log ring until this is dropped (then within half a
/// second, with a last read).
pub struct KernelLog {
    stop: Arc<AtomicBool>,
}

impl KernelLog {
    pub fn drain<L: log::Log + Send + 'static>(mut logger: EbpfLogger<L>) -> Result<KernelLog, FastpathError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("tm-ebpf-log".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    if matches!(poll::readable([logger.as_fd()], Duration::from_millis(500)), Ok([true])) {
                        logger.flush();
                    }
                }
                logger.flush();
            })
            .map_err(|e| FastpathError::Log(format!("cannot start its reader thread: {e}")))?;
        Ok(KernelLog { stop })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The lines a test's programs logged.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<String>>>);

#[cfg(test)]
impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }

    fn flush(&self) {}
}

#[cfg(test)]
impl Captured {
    /// What `logger` has read so far (reading what is queued first).
    pub fn lines(&self, logger: &mut EbpfLogger<Captured>) -> Vec<String> {
        logger.flush();
        self.0.lock().unwrap().clone()
    }
}
