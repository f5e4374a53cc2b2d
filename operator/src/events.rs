//! Events on a table, best effort: a failure to record one is logged and never fails the
//! reconcile. The API server refuses a note over 1 KiB, so a long one (an API error quoting
//! a whole spec) is shortened to fit instead of being lost.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// The API server's limit on an Event's note, in bytes.
pub const MAX_NOTE: usize = 1024;

pub async fn publish(
    client: &Client,
    reporter: &Reporter,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let recorder = Recorder::new(client.clone(), reporter.clone());
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(fit(note)),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason, "cannot record event");
    }
}

/// `note` cut at a character boundary so that it, with an ellipsis, fits [`MAX_NOTE`].
pub fn fit(mut note: String) -> String {
    if note.len() <= MAX_NOTE {
        return note;
    }
    let mut end = MAX_NOTE - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push('…');
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_note_is_cut_to_fit_at_a_character_boundary() {
        assert_eq!(fit("short".into()), "short");
        let long = "é".repeat(800);
        let cut = fit(long);
        assert!(cut.len() <= MAX_NOTE, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
