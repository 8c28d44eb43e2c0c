//! berth net
