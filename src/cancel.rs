//! Cancellation: gitlab-runner sends SIGTERM to our process group on cancel or timeout (SIGKILL
//! follows after graceful_kill_timeout). Hooks watch this token and wind down promptly.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Cancel {
    receiver: watch::Receiver<Option<&'static str>>,
}

pub struct CancelTrigger {
    sender: watch::Sender<Option<&'static str>>,
}

impl CancelTrigger {
    pub fn cancel(&self, reason: &'static str) {
        self.sender.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

impl Cancel {
    pub fn new() -> (CancelTrigger, Cancel) {
        let (sender, receiver) = watch::channel(None);
        (CancelTrigger { sender }, Cancel { receiver })
    }

    /// A token that is never cancelled.
    pub fn never() -> Cancel {
        let (trigger, cancel) = Cancel::new();
        std::mem::forget(trigger);
        cancel
    }

    /// Installs SIGTERM/SIGINT handlers that cancel the returned token. Needs a tokio runtime.
    pub fn on_signals() -> std::io::Result<Cancel> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (trigger, cancel) = Cancel::new();
        tokio::spawn(async move {
            let reason = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            trigger.cancel(reason);
            // Keep the handlers installed so a second signal does not kill us mid-cleanup.
            loop {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
        });
        Ok(cancel)
    }

    pub fn reason(&self) -> Option<&'static str> {
        *self.receiver.borrow()
    }

    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }

    /// Resolves when cancelled, with the reason (e.g. "SIGTERM").
    pub async fn cancelled(&self) -> &'static str {
        let mut receiver = self.receiver.clone();
        loop {
            if let Some(reason) = *receiver.borrow_and_update() {
                return reason;
            }
            if receiver.changed().await.is_err() {
                // The trigger is gone without cancelling: never resolve.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cancel_wakes_waiters_once_with_the_first_reason() {
        let (trigger, cancel) = Cancel::new();
        let waiter = tokio::spawn({
            let cancel = cancel.clone();
            async move { cancel.cancelled().await }
        });
        trigger.cancel("SIGTERM");
        trigger.cancel("SIGINT");
        assert_eq!(waiter.await.unwrap(), "SIGTERM");
        assert!(cancel.is_cancelled());
    }
}
