//! Example plugin: accepts notifications and delivers each from a
//! background task, POSTing it to a webhook service (any registered
//! service, typically a remote one), retrying on failure. Mounted at
//! `/api/notification-service/`; `GET /notifications/{id}` shows where a
//! delivery is.
//!
//! Settings (`[plugin.notification-service.settings]`), all optional:
//! `webhook_service` ("webhook"), `webhook_path` ("/notify"),
//! `max_attempts` (3) and `retry_ms` (1000).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plugin_api::{
    Call, Context, Error, Json, Plugin, Request, Response, Result, Router, ServiceConfig, Stop,
    export_plugin, log,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    webhook_service: String,
    webhook_path: String,
    max_attempts: u32,
    retry_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            webhook_service: "webhook".to_owned(),
            webhook_path: "/notify".to_owned(),
            max_attempts: 3,
            retry_ms: 1000,
        }
    }
}

#[derive(Deserialize)]
struct NewNotification {
    message: String,
    recipient: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Pending,
    Delivered,
    Failed,
}

#[derive(Clone, Serialize)]
struct Notification {
    id: u64,
    message: String,
    recipient: Option<String>,
    status: Status,
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Default)]
struct Store {
    last_id: u64,
    notifications: BTreeMap<u64, Notification>,
}

/// What a delivery task needs: shared with the handlers.
#[derive(Clone)]
struct Outbox {
    ctx: Context,
    settings: Arc<Settings>,
    store: Arc<Mutex<Store>>,
}

struct Notifications {
    outbox: Outbox,
}

impl Plugin for Notifications {
    fn config() -> ServiceConfig {
        ServiceConfig::new("notification-service")
            .display_name("Notification Service")
            .description("Delivers notifications to a webhook, with retries")
            .version(env!("CARGO_PKG_VERSION"))
            .tag("example")
    }

    fn init(ctx: &Context) -> Result<Self> {
        let outbox = Outbox {
            ctx: ctx.clone(),
            settings: Arc::new(ctx.settings()?),
            store: Arc::default(),
        };
        Ok(Notifications { outbox })
    }

    fn router() -> Router<Self> {
        Router::new()
            .get("/health", "Health check", health)
            .post(
                "/notifications",
                "Accepts a notification for delivery",
                notify,
            )
            .get("/notifications", "Lists the notifications", list)
            .get(
                "/notifications/{id}",
                "One notification's delivery status",
                status,
            )
    }
}

impl Outbox {
    fn update(&self, id: u64, change: impl FnOnce(&mut Notification)) -> Option<Notification> {
        let mut store = self.store.lock().unwrap();
        let notification = store.notifications.get_mut(&id)?;
        change(notification);
        Some(notification.clone())
    }

    /// The background task: POSTs the notification to the webhook until it
    /// is accepted, `max_attempts` times at most, `retry_ms` apart. The
    /// host's stop signal (an unload) ends the retries early.
    fn deliver(&self, id: u64, stop: &Stop) {
        let settings = &self.settings;
        for attempt in 1..=settings.max_attempts {
            let Some(notification) = self.update(id, |n| n.attempts = attempt) else {
                return;
            };
            let outcome = match Call::post(&settings.webhook_path).json(&notification) {
                Ok(call) => {
                    let response = self.ctx.call(&settings.webhook_service, call);
                    Context::expect_json::<serde_json::Value>(&settings.webhook_service, &response)
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(_) => {
                    self.update(id, |n| n.status = Status::Delivered);
                    log::info!("notification {id} delivered (attempt {attempt})");
                    return;
                }
                Err(error) => {
                    log::warn!(
                        "notification {id}: attempt {attempt} failed: {}",
                        error.message()
                    );
                    self.update(id, |n| n.last_error = Some(error.message().to_owned()));
                }
            }
            if attempt < settings.max_attempts
                && !stop.sleep(Duration::from_millis(settings.retry_ms))
            {
                break;
            }
        }
        self.update(id, |n| n.status = Status::Failed);
    }
}

fn health(_: &Notifications, _: &Request) -> Result<Response> {
    Response::json(&json!({ "status": "healthy" }))
}

fn notify(state: &Notifications, req: &Request) -> Result<Response> {
    let Json(new): Json<NewNotification> = req.extract()?;
    let notification = {
        let mut store = state.outbox.store.lock().unwrap();
        store.last_id += 1;
        let notification = Notification {
            id: store.last_id,
            message: new.message,
            recipient: new.recipient,
            status: Status::Pending,
            attempts: 0,
            last_error: None,
        };
        store
            .notifications
            .insert(notification.id, notification.clone());
        notification
    };
    // Answered now; delivered after, as FastAPI's BackgroundTasks would.
    let outbox = state.outbox.clone();
    let id = notification.id;
    state
        .outbox
        .ctx
        .spawn(move |stop| outbox.deliver(id, stop))?;
    Ok(Response::json(&notification)?.with_status(202))
}

fn list(state: &Notifications, _: &Request) -> Result<Response> {
    let store = state.outbox.store.lock().unwrap();
    Response::json(&store.notifications.values().collect::<Vec<_>>())
}

fn status(state: &Notifications, req: &Request) -> Result<Response> {
    let id: u64 = req.param_as("id")?;
    let store = state.outbox.store.lock().unwrap();
    let notification = store
        .notifications
        .get(&id)
        .ok_or_else(|| Error::not_found(format!("notification {id} not found")))?;
    Response::json(notification)
}

export_plugin!(Notifications);

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use plugin_api::testing::{MockContext, TestClient};
    use serde_json::Value;

    use super::*;

    fn body(response: &Response) -> Value {
        serde_json::from_slice(response.body_bytes()).unwrap()
    }

    #[test]
    fn a_notification_is_delivered_after_a_failed_attempt() {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let mock = MockContext::new().stub("webhook", move |call| {
            assert_eq!(call.path(), "/notify");
            let sent: Value = serde_json::from_slice(call.body_bytes()).unwrap();
            assert_eq!(sent["message"], "hi");
            if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                Response::new(503)
            } else {
                Response::json(&json!({"ok": true})).unwrap()
            }
        });
        let client = TestClient::<Notifications>::with_context(mock).unwrap();
        let accepted = client.post_json("/notifications", &json!({"message": "hi"}));
        assert_eq!(accepted.status(), 202);
        assert_eq!(body(&accepted)["status"], "pending");

        client.run_background();
        let delivered = body(&client.get("/notifications/1"));
        assert_eq!(delivered["status"], "delivered");
        assert_eq!(delivered["attempts"], 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(
            client
                .logs()
                .iter()
                .any(|line| line.contains("notification 1 delivered (attempt 2)")),
            "{:?}",
            client.logs()
        );
    }

    #[test]
    fn without_a_webhook_it_fails_after_the_last_attempt() {
        let client = TestClient::<Notifications>::with_context(
            MockContext::new().setting("max_attempts", 2),
        )
        .unwrap();
        client.post_json(
            "/notifications",
            &json!({"message": "lost", "recipient": "ops"}),
        );
        client.run_background();
        let failed = body(&client.get("/notifications/1"));
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["attempts"], 2);
        assert!(
            failed["last_error"]
                .as_str()
                .unwrap()
                .contains("service `webhook` answered 404")
        );
    }

    #[test]
    fn a_notification_without_a_message_is_422() {
        let client = TestClient::<Notifications>::new().unwrap();
        let refused = client.post_json("/notifications", &json!({"recipient": "ops"}));
        assert_eq!(refused.status(), 422);
        assert!(
            body(&refused)["detail"]
                .as_str()
                .unwrap()
                .contains("message")
        );
        assert_eq!(client.get("/notifications/9").status(), 404);
    }
}
