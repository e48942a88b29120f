//! Loader placeholder: being written.
