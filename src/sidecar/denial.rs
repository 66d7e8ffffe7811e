//! Each way a tool call can be refused or fail, as a small type. [`super::rescue`] is the one
//! place that turns them into MCP tool results, JSON-RPC errors or HTTP responses.

use std::fmt;

/// A policy forbade the call (or its output).
#[derive(Debug, Clone)]
pub struct PolicyDenied {
    pub policy: String,
    pub rule: &'static str,
    pub detail: String,
    /// Whether the output, not the call, was refused.
    pub output: bool,
}

/// No valid policy set is loaded: the sidecar fails closed.
#[derive(Debug, Clone)]
pub struct FailClosed {
    pub reason: String,
}

/// The call's arguments (or a `tools/call` itself) cannot be read, so cannot be judged.
#[derive(Debug, Clone)]
pub struct Unjudgeable {
    pub reason: String,
}

/// The agent's request body is compressed (`Content-Encoding`): the sidecar cannot judge it,
/// and the tool would decode what was never judged.
#[derive(Debug, Clone)]
pub struct Compressed {
    pub coding: String,
}

/// The agent did not send its request body in time.
#[derive(Debug, Clone)]
pub struct SlowClient {
    pub waited: std::time::Duration,
}

/// The tool did not answer within `max_execution_time_ms`.
#[derive(Debug, Clone)]
pub struct DeadlineExceeded {
    pub limit_ms: u64,
    pub policy: String,
}

/// A body or stream event larger than the cap.
#[derive(Debug, Clone)]
pub struct TooLarge {
    pub limit: u64,
    pub what: &'static str,
}

/// The upstream is down, broke off, or answered something that is not what it should be.
#[derive(Debug, Clone)]
pub struct UpstreamFailed {
    pub upstream: String,
    pub reason: String,
}

/// The request names a host the tool listener does not answer to: DNS-rebinding protection
/// ([`super::origin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignHost {
    /// `Host` or `Origin`.
    pub header: &'static str,
    pub value: String,
}

#[derive(Debug, Clone)]
pub enum Refusal {
    Policy(PolicyDenied),
    FailClosed(FailClosed),
    Unjudgeable(Unjudgeable),
    SlowClient(SlowClient),
    Compressed(Compressed),
    Deadline(DeadlineExceeded),
    TooLarge(TooLarge),
    Upstream(UpstreamFailed),
    ForeignHost(ForeignHost),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Policy(p) if p.output => write!(
                f,
                "The tool's output was withheld by policy `{}` (rule {}): {}",
                p.policy, p.rule, p.detail
            ),
            Refusal::Policy(p) => write!(
                f,
                "Blocked by policy `{}` (rule {}): {}",
                p.policy, p.rule, p.detail
            ),
            Refusal::FailClosed(p) => write!(f, "Refused by the perfecx sidecar: {}", p.reason),
            Refusal::Unjudgeable(p) => write!(
                f,
                "Refused by the perfecx sidecar: the call cannot be checked: {}",
                p.reason
            ),
            Refusal::SlowClient(p) => write!(
                f,
                "Refused by the perfecx sidecar: the request body did not arrive within {:?}",
                p.waited
            ),
            Refusal::Compressed(p) => write!(
                f,
                "Refused by the perfecx sidecar: the request body is compressed (Content-Encoding: {}); send it uncompressed, as the sidecar judges only what it can read",
                p.coding
            ),
            Refusal::Deadline(p) => write!(
                f,
                "The tool did not answer within {} ms (policy `{}`, rule execution_limit)",
                p.limit_ms, p.policy
            ),
            Refusal::TooLarge(p) => write!(
                f,
                "The {} is larger than the limit of {} bytes",
                p.what, p.limit
            ),
            Refusal::Upstream(p) => {
                write!(f, "The tool server `{}` failed: {}", p.upstream, p.reason)
            }
            Refusal::ForeignHost(p) => write!(
                f,
                "Refused by the perfecx sidecar: {} `{}` names a host it does not answer to (see `allowed_hosts`)",
                p.header, p.value
            ),
        }
    }
}

impl From<PolicyDenied> for Refusal {
    fn from(v: PolicyDenied) -> Self {
        Refusal::Policy(v)
    }
}
impl From<FailClosed> for Refusal {
    fn from(v: FailClosed) -> Self {
        Refusal::FailClosed(v)
    }
}
impl From<Unjudgeable> for Refusal {
    fn from(v: Unjudgeable) -> Self {
        Refusal::Unjudgeable(v)
    }
}
impl From<Compressed> for Refusal {
    fn from(v: Compressed) -> Self {
        Refusal::Compressed(v)
    }
}

impl From<SlowClient> for Refusal {
    fn from(v: SlowClient) -> Self {
        Refusal::SlowClient(v)
    }
}
impl From<DeadlineExceeded> for Refusal {
    fn from(v: DeadlineExceeded) -> Self {
        Refusal::Deadline(v)
    }
}
impl From<TooLarge> for Refusal {
    fn from(v: TooLarge) -> Self {
        Refusal::TooLarge(v)
    }
}
impl From<UpstreamFailed> for Refusal {
    fn from(v: UpstreamFailed) -> Self {
        Refusal::Upstream(v)
    }
}
impl From<ForeignHost> for Refusal {
    fn from(v: ForeignHost) -> Self {
        Refusal::ForeignHost(v)
    }
}
