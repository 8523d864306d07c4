//! Streaming tar reader that keeps each entry's raw header blocks next to its parsed metadata.
