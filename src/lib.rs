//! snapvm
