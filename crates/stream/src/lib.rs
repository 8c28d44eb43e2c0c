//! berth stream
