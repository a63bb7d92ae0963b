//! Background threads that never end silently: a panic in one is caught and handed, with the
//! thread's name and the panic's message, to its owner, which logs it and decides what the user
//! sees from then on (an export that fails writes and FLUSH, a stats file no longer updated).
//!
//! Uncaught, a panic would end the thread with a line on stderr (which nbdkit may not keep) and
//! nothing else: an export whose background writer died would go on acknowledging writes.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a panic says: its message, or a placeholder for a payload that is not text.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Starts thread `name` running `body`. If `body` panics, `on_panic` runs on that thread with
/// `thread NAME panicked: MESSAGE`; it must log it and make the failure visible.
///
/// # Errors
/// The system refusing a new thread.
pub(crate) fn spawn(
    name: &str,
    body: impl FnOnce() + Send + 'static,
    on_panic: impl FnOnce(String) + Send + 'static,
) -> std::io::Result<()> {
    let thread = name.to_string();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(body)) {
            on_panic(format!("thread {thread} panicked: {}", panic_message(&*panic)));
        }
    });
    spawned.map(drop)
}

/// What tests see of the log: warnings and errors, captured in memory.
#[cfg(test)]
pub(crate) mod captured_log {
    use std::sync::{Mutex, Once};

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }

        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                crate::lock(&LINES).push(format!("{} {}", record.level(), record.args()));
            }
        }

        fn flush(&self) {}
    }

    /// Starts capturing (once per test process); call it before what logs.
    pub(crate) fn start() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            log::set_logger(&Capture).expect("no other logger in unit tests");
            log::set_max_level(log::LevelFilter::Warn);
        });
    }

    /// The lines logged so far that contain `text`, each as `LEVEL message`. Tests run in
    /// parallel into one log, so `text` should be unique to the test.
    pub(crate) fn lines_with(text: &str) -> Vec<String> {
        crate::lock(&LINES).iter().filter(|l| l.contains(text)).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_panic_reaches_the_owner_with_the_thread_name_and_message() {
        let (tx, rx) = mpsc::channel();
        spawn("nbds3-test", || panic!("boom {}", 42), move |what| tx.send(what).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "thread nbds3-test panicked: boom 42");
        let (tx, rx) = mpsc::channel::<String>();
        spawn("nbds3-test", || {}, move |what| tx.send(what).unwrap()).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(5)).is_err(), "a thread that returns is no failure");
    }
}
