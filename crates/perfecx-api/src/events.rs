use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// At most this many events in one `{"events": [...]}` batch.
pub const MAX_BATCH_EVENTS: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    ToolExecution,
    PolicyViolation,
    LlmCall,
    MemoryAccess,
    Error,
    Custom,
}

pub const EVENT_TYPES: [EventType; 6] = [
    EventType::ToolExecution,
    EventType::PolicyViolation,
    EventType::LlmCall,
    EventType::MemoryAccess,
    EventType::Error,
    EventType::Custom,
];

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ToolExecution => "tool_execution",
            EventType::PolicyViolation => "policy_violation",
            EventType::LlmCall => "llm_call",
            EventType::MemoryAccess => "memory_access",
            EventType::Error => "error",
            EventType::Custom => "custom",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EVENT_TYPES.into_iter().find(|t| t.as_str() == text)
    }
}

/// One event as an agent (or its sidecar) sends it to `POST /v1/agents/{agent_id}/events`.
///
/// `event_id` makes a resend idempotent: an id already stored for this agent is not stored
/// again. `timestamp` is RFC 3339 and defaults to the time of receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<Uuid>,
    pub event_type: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub data: Map<String, Value>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub context: Map<String, Value>,
}

/// `{"events": [...]}`, up to [`MAX_BATCH_EVENTS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    pub events: Vec<NewEvent>,
}

/// The `202 Accepted` answer: `received` = `stored` + `duplicates`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventsAccepted {
    pub received: u64,
    /// Events new to the store.
    pub stored: u64,
    /// Events whose `event_id` was already stored (a resend).
    pub duplicates: u64,
}
