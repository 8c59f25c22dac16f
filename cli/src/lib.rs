//! CLI library
