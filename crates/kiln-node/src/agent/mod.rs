//! Host side of the guest agent protocol (owned by the agent work; placeholder).
