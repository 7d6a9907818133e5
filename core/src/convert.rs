//! Domain states and their mapping to and from `chorus.v1` enums. The store keeps the domain
//! names (`as_str`), never protobuf numbers, so the wire format can evolve on its own.

use crate::error::CoreError;
use chorus_proto::pb;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentState {
    Active,
    Paused,
    Completed,
    Failed,
    Killed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialState {
    Pending,
    Running,
    Completed,
    Failed,
    Killed,
    /// Held at a rung by successive halving until promoted; not placed, not counted as active.
    Paused,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl std::str::FromStr for $t {
            type Err = CoreError;
            fn from_str(s: &str) -> Result<Self, CoreError> {
                match s {
                    $($s => Ok(Self::$v),)*
                    other => Err(CoreError::Conversion(format!("unknown {} {other:?}", stringify!($t)))),
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum!(ExperimentState { Active => "active", Paused => "paused", Completed => "completed", Failed => "failed", Killed => "killed" });
str_enum!(TrialState { Pending => "pending", Running => "running", Completed => "completed", Failed => "failed", Killed => "killed", Paused => "paused" });

impl ExperimentState {
    /// Ended experiments never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Killed)
    }
}

impl TrialState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Killed)
    }
}

impl From<ExperimentState> for pb::ExperimentState {
    fn from(s: ExperimentState) -> Self {
        match s {
            ExperimentState::Active => pb::ExperimentState::Active,
            ExperimentState::Paused => pb::ExperimentState::Paused,
            ExperimentState::Completed => pb::ExperimentState::Completed,
            ExperimentState::Failed => pb::ExperimentState::Failed,
            ExperimentState::Killed => pb::ExperimentState::Killed,
        }
    }
}

impl TryFrom<pb::ExperimentState> for ExperimentState {
    type Error = CoreError;
    fn try_from(s: pb::ExperimentState) -> Result<Self, CoreError> {
        Ok(match s {
            pb::ExperimentState::Active => ExperimentState::Active,
            pb::ExperimentState::Paused => ExperimentState::Paused,
            pb::ExperimentState::Completed => ExperimentState::Completed,
            pb::ExperimentState::Failed => ExperimentState::Failed,
            pb::ExperimentState::Killed => ExperimentState::Killed,
            pb::ExperimentState::Unspecified => {
                return Err(CoreError::Conversion("experiment state unspecified".into()));
            }
        })
    }
}

impl From<TrialState> for pb::TrialState {
    fn from(s: TrialState) -> Self {
        match s {
            TrialState::Pending => pb::TrialState::Pending,
            TrialState::Running => pb::TrialState::Running,
            TrialState::Completed => pb::TrialState::Completed,
            TrialState::Failed => pb::TrialState::Failed,
            TrialState::Killed => pb::TrialState::Killed,
            TrialState::Paused => pb::TrialState::Paused,
        }
    }
}

impl TryFrom<pb::TrialState> for TrialState {
    type Error = CoreError;
    fn try_from(s: pb::TrialState) -> Result<Self, CoreError> {
        Ok(match s {
            pb::TrialState::Pending => TrialState::Pending,
            pb::TrialState::Running => TrialState::Running,
            pb::TrialState::Completed => TrialState::Completed,
            pb::TrialState::Failed => TrialState::Failed,
            pb::TrialState::Killed => TrialState::Killed,
            pb::TrialState::Paused => TrialState::Paused,
            pb::TrialState::Unspecified => return Err(CoreError::Conversion("trial state unspecified".into())),
        })
    }
}

/// Display name of a wire trial state, for clients that receive raw enum numbers.
pub fn trial_state_name(v: i32) -> &'static str {
    pb::TrialState::try_from(v)
        .ok()
        .and_then(|s| TrialState::try_from(s).ok())
        .map_or("unknown", TrialState::as_str)
}

/// Display name of a wire experiment state.
pub fn experiment_state_name(v: i32) -> &'static str {
    pb::ExperimentState::try_from(v)
        .ok()
        .and_then(|s| ExperimentState::try_from(s).ok())
        .map_or("unknown", ExperimentState::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in [
            TrialState::Pending,
            TrialState::Running,
            TrialState::Completed,
            TrialState::Failed,
            TrialState::Killed,
            TrialState::Paused,
        ] {
            assert_eq!(s.as_str().parse::<TrialState>().unwrap(), s);
            assert_eq!(TrialState::try_from(pb::TrialState::from(s)).unwrap(), s);
            assert_eq!(trial_state_name(pb::TrialState::from(s) as i32), s.as_str());
        }
        for s in [
            ExperimentState::Active,
            ExperimentState::Paused,
            ExperimentState::Killed,
        ] {
            assert_eq!(s.as_str().parse::<ExperimentState>().unwrap(), s);
            assert_eq!(ExperimentState::try_from(pb::ExperimentState::from(s)).unwrap(), s);
        }
        assert!("bogus".parse::<TrialState>().is_err());
    }
}
