//! Reads a Nydus image back with nydus's own reader (nydus-rafs): the bootstrap's inode tree,
//! and file contents through the chunk table from data blobs in a directory (named by blob id,
//! as nydusd's localfs backend finds them). Tests and the conformance checks compare the tree
//! with the source image's.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use nydus_api::ConfigV2;
use nydus_rafs::metadata::{RafsSuper, RafsVersion};
use sha2::{Digest as _, Sha256};

/// The kind of a file in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

/// One file of the tree, with what a runtime sees of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub kind: FileKind,
    /// Permission bits, with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Target of a symlink.
    pub link: Option<String>,
    /// Device numbers (major, minor) of a character or block device.
    pub device: Option<(u32, u32)>,
    /// Size and sha256 hex of a regular file's contents.
    pub size: u64,
    pub sha256: Option<String>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Inode number; paths sharing one are hard links of each other.
    pub ino: u64,
}

/// A read image: the RAFS version and the files by absolute path (`/` included).
#[derive(Debug)]
pub struct Tree {
    pub fs_version: u32,
    /// Blob ids of the bootstrap's blob table.
    pub blob_ids: Vec<String>,
    /// Entries of the prefetch table (one per prefetch pattern found in the tree).
    pub prefetch_entries: u32,
    pub files: BTreeMap<String, FileEntry>,
}

/// Loads `bootstrap` and reads every file, contents from the blobs in `blob_dir`.
pub fn read_tree(bootstrap: &Path, blob_dir: &Path) -> Result<Tree, String> {
    let config = Arc::new(ConfigV2::default());
    let (rs, _) = RafsSuper::load_from_file(bootstrap, config, false).map_err(|e| {
        format!(
            "nydus could not load bootstrap {}: {e}",
            bootstrap.display()
        )
    })?;
    let fs_version =
        match RafsVersion::try_from(rs.meta.version).map_err(|e| format!("RAFS version: {e}"))? {
            RafsVersion::V5 => 5,
            RafsVersion::V6 => 6,
        };
    let blobs = rs.superblock.get_blob_infos();
    let blob_ids: Vec<String> = blobs.iter().map(|b| b.blob_id()).collect();
    let mut open: HashMap<u32, File> = HashMap::new();
    let mut files = BTreeMap::new();
    let mut failure = None;
    rs.walk_directory(
        rs.superblock.root_ino(),
        None::<&Path>,
        &mut |inode, path| {
            let result = (|| -> Result<FileEntry, String> {
                let attr = inode.get_attr();
                let kind = match attr.mode & libc::S_IFMT {
                    libc::S_IFREG => FileKind::Regular,
                    libc::S_IFDIR => FileKind::Directory,
                    libc::S_IFLNK => FileKind::Symlink,
                    libc::S_IFCHR => FileKind::Char,
                    libc::S_IFBLK => FileKind::Block,
                    libc::S_IFIFO => FileKind::Fifo,
                    libc::S_IFSOCK => FileKind::Socket,
                    other => return Err(format!("unknown file type {other:o}")),
                };
                let link = if kind == FileKind::Symlink {
                    Some(
                        inode
                            .get_symlink()
                            .map_err(|e| format!("symlink: {e}"))?
                            .to_string_lossy()
                            .into_owned(),
                    )
                } else {
                    None
                };
                let device = matches!(kind, FileKind::Char | FileKind::Block).then(|| {
                    let rdev = inode.rdev() as u64;
                    (libc::major(rdev), libc::minor(rdev))
                });
                let mut xattrs = BTreeMap::new();
                if inode.has_xattr() {
                    for name in inode.get_xattrs().map_err(|e| format!("xattrs: {e}"))? {
                        let key = std::ffi::OsStr::from_bytes(&name);
                        let value = inode
                            .get_xattr(key)
                            .map_err(|e| format!("xattr: {e}"))?
                            .unwrap_or_default();
                        xattrs.insert(key.to_string_lossy().into_owned(), value);
                    }
                }
                let sha256 = if kind == FileKind::Regular {
                    let mut hasher = Sha256::new();
                    let mut read = 0u64;
                    for i in 0..inode.get_chunk_count() {
                        let chunk = inode
                            .get_chunk_info(i)
                            .map_err(|e| format!("chunk {i}: {e}"))?;
                        let blob_index = chunk.blob_index();
                        let blob = blobs.get(blob_index as usize).ok_or_else(|| {
                            format!("chunk {i} names blob {blob_index}, not in the blob table")
                        })?;
                        let file = match open.entry(blob_index) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                let p = blob_dir.join(blob.blob_id());
                                e.insert(
                                    File::open(&p)
                                        .map_err(|err| format!("blob {}: {err}", p.display()))?,
                                )
                            }
                        };
                        let mut raw = vec![0u8; chunk.compressed_size() as usize];
                        file.read_exact_at(&mut raw, chunk.compressed_offset())
                            .map_err(|e| {
                                format!(
                                    "chunk {i} at {} of blob {}: {e}",
                                    chunk.compressed_offset(),
                                    blob.blob_id()
                                )
                            })?;
                        let data = if chunk.is_compressed() {
                            let mut out = vec![0u8; chunk.uncompressed_size() as usize];
                            let n = nydus_utils::compress::decompress(
                                &raw,
                                &mut out,
                                blob.compressor(),
                            )
                            .map_err(|e| format!("chunk {i} of blob {}: {e}", blob.blob_id()))?;
                            out.truncate(n);
                            out
                        } else {
                            raw
                        };
                        if data.len() != chunk.uncompressed_size() as usize {
                            return Err(format!(
                                "chunk {i} is {} bytes, the chunk table says {}",
                                data.len(),
                                chunk.uncompressed_size()
                            ));
                        }
                        hasher.update(&data);
                        read += data.len() as u64;
                    }
                    if read != attr.size {
                        return Err(format!(
                            "contents are {read} bytes, the inode says {}",
                            attr.size
                        ));
                    }
                    Some(hex::encode(hasher.finalize()))
                } else {
                    None
                };
                Ok(FileEntry {
                    kind,
                    mode: attr.mode & 0o7777,
                    uid: attr.uid,
                    gid: attr.gid,
                    link,
                    device,
                    size: if kind == FileKind::Regular {
                        attr.size
                    } else {
                        0
                    },
                    sha256,
                    xattrs,
                    ino: attr.ino,
                })
            })();
            match result {
                Ok(entry) => {
                    files.insert(path.to_string_lossy().into_owned(), entry);
                }
                Err(why) if failure.is_none() => {
                    failure = Some(format!("{}: {why}", path.display()))
                }
                Err(_) => {}
            }
            Ok(())
        },
    )
    .map_err(|e| format!("walking the bootstrap: {e:#}"))?;
    if let Some(f) = failure {
        return Err(f);
    }
    Ok(Tree {
        fs_version,
        blob_ids,
        prefetch_entries: rs.meta.prefetch_table_entries,
        files,
    })
}
