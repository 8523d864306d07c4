//! Prioritized-file ordering: the source tar is spilled to a temp file so that chosen entries
//! can be written first without holding the layer in memory.
//!
//! Only entries on the way to a prioritized file are indexed: the file itself, its parent
//! directories, and (transitively) the targets of hard links among them, because a reader
//! extracting the prioritized part alone must be able to create them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use super::clean_name;
use crate::drivers::tar::{EntryType, TarReader};
use crate::drivers::DriverError;

/// Hard links pointing at hard links are followed this deep; real layers use one level.
const MAX_LINK_DEPTH: usize = 8;

pub struct Spill {
    file: File,
    front: Vec<u64>,
    placed: HashSet<u64>,
}

#[derive(Debug)]
struct Location {
    offset: u64,
    /// Cleaned target, for hard links.
    link: Option<String>,
}

impl Spill {
    /// Copies the whole tar stream from `input` to a temp file and works out which entries
    /// (by offset) go first, in order. Prioritized names that the layer lacks are skipped.
    pub fn new(input: &mut dyn Read, prioritized: &[String], skip: impl Fn(&str) -> bool) -> Result<Spill, DriverError> {
        let file = tempfile::tempfile()?;
        let mut wanted: HashSet<String> = HashSet::new();
        for p in prioritized {
            wanted.extend(with_ancestors(&clean_name(p.as_bytes())));
        }
        let mut index: HashMap<String, Vec<Location>> = HashMap::new();
        {
            let mut tr = TarReader::new(Tee { input: &mut *input, copy: &file });
            index_entries(&mut tr, &wanted, &skip, &mut index)?;
            crate::drivers::compression::drain(tr.into_inner().input)?;
        }

        // Hard-link targets outside the set are found by scanning the spill again; this only
        // happens when a prioritized file is a hard link, so the extra pass is rare.
        loop {
            let missing: HashSet<String> = index
                .values()
                .flatten()
                .filter_map(|loc| loc.link.as_deref())
                .flat_map(with_ancestors)
                .filter(|name| !wanted.contains(name))
                .collect();
            if missing.is_empty() {
                break;
            }
            wanted.extend(missing.iter().cloned());
            let mut tr = reader_at(&file, 0)?;
            index_entries(&mut tr, &missing, &skip, &mut index)?;
        }

        let mut spill = Spill { file, front: Vec::new(), placed: HashSet::new() };
        for p in prioritized {
            let name = clean_name(p.as_bytes());
            if index.contains_key(&name) {
                spill.place(&index, &name, 0);
            } else {
                tracing::debug!(file = %p, "prioritized file is not in the layer; ignored");
            }
        }
        Ok(spill)
    }

    /// Offsets of the entries that go first, in order.
    pub fn front(&self) -> &[u64] {
        &self.front
    }

    pub fn is_front(&self, offset: u64) -> bool {
        self.placed.contains(&offset)
    }

    /// A tar reader over the spilled stream, starting at the entry at `offset`.
    pub fn reader_at(&self, offset: u64) -> Result<TarReader<&File>, DriverError> {
        reader_at(&self.file, offset)
    }

    /// Parents first, then hard-link targets, then every entry of the name itself.
    fn place(&mut self, index: &HashMap<String, Vec<Location>>, name: &str, depth: usize) {
        for ancestor in with_ancestors(name) {
            let Some(locations) = index.get(&ancestor) else { continue };
            if depth < MAX_LINK_DEPTH {
                for target in locations.iter().filter_map(|loc| loc.link.as_deref()) {
                    self.place(index, target, depth + 1);
                }
            }
            for loc in locations {
                if self.placed.insert(loc.offset) {
                    self.front.push(loc.offset);
                }
            }
        }
    }
}

fn reader_at(file: &File, offset: u64) -> Result<TarReader<&File>, DriverError> {
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    Ok(TarReader::with_offset(f, offset))
}

fn index_entries<R: Read>(
    tr: &mut TarReader<R>,
    wanted: &HashSet<String>,
    skip: &impl Fn(&str) -> bool,
    index: &mut HashMap<String, Vec<Location>>,
) -> Result<(), DriverError> {
    while let Some(entry) = tr.next_entry()? {
        let name = clean_name(&entry.header.name);
        if !wanted.contains(&name) || skip(&name) {
            continue;
        }
        let link = (entry.header.entry_type == EntryType::HardLink).then(|| clean_name(&entry.header.linkname));
        index.entry(name).or_default().push(Location { offset: entry.offset, link });
    }
    Ok(())
}

/// `a/b/c` → `["", "a", "a/b", "a/b/c"]`: the root, each parent, then the name itself.
fn with_ancestors(name: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    if !name.is_empty() {
        out.extend(name.match_indices('/').map(|(i, _)| name[..i].to_string()));
        out.push(name.to_string());
    }
    out
}

/// Copies everything read from `input` to `copy`.
struct Tee<'a> {
    input: &'a mut dyn Read,
    copy: &'a File,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors() {
        assert_eq!(with_ancestors("a/b/c"), ["", "a", "a/b", "a/b/c"]);
        assert_eq!(with_ancestors("a"), ["", "a"]);
        assert_eq!(with_ancestors(""), [""]);
    }
}
