//! CloudEvents SQL v1: parser and evaluator (placeholder).
