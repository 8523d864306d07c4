//! Decompression of source layers: gzip, zstd or plain tar, chosen by media type or magic bytes.
