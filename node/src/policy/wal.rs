//! Durable policy: an append-only log of accepted versions in the data dir.
//!
//! Record: `[len: u32 LE][crc32: u32 LE][bincode (Key, Register, Option<WriterProof>)]`; a
//! record of the first format, without the proof, is still read. An accepted local write
//! is appended and fsynced before the API answers. On start the log is replayed; a torn or
//! corrupt tail (a `kill -9` mid-write) ends the replay and is cut off, so a crash never
//! corrupts what was acknowledged. When the log grows past twice the live state it is
//! rewritten (temp file, fsync, rename, fsync of the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use trellis_proto::WriterProof;

use trellis_core::policy::store::{Key, Register};

const MAX_RECORD: usize = 1 << 20;
const COMPACT_MIN_BYTES: u64 = 1 << 20;

pub struct Wal {
    path: PathBuf,
    file: File,
    bytes: u64,
}

fn encode(key: &Key, reg: &Register) -> Vec<u8> {
    let body =
        bincode::serde::encode_to_vec((key, reg, &reg.val.proof), bincode::config::standard()).expect("Vec writer");
    let mut rec = Vec::with_capacity(8 + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// One record body, of either format (the older one ends before the proof).
fn decode(body: &[u8]) -> Option<(Key, Register)> {
    let cfg = bincode::config::standard();
    if let Ok(((key, mut reg, proof), _)) =
        bincode::serde::decode_from_slice::<(Key, Register, Option<WriterProof>), _>(body, cfg)
    {
        reg.val.proof = proof;
        return Some((key, reg));
    }
    bincode::serde::decode_from_slice::<(Key, Register), _>(body, cfg).ok().map(|(rec, _)| rec)
}

/// Reads records until the end or the first bad one; returns them and the good length.
fn replay(bytes: &[u8]) -> (Vec<(Key, Register)>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || bytes.len() - at - 8 < len {
            break;
        }
        let body = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        match decode(body) {
            Some(rec) => out.push(rec),
            None => break,
        }
        at += 8 + len;
    }
    (out, at)
}

impl Wal {
    /// Opens (or creates) `dir/policy.log`, returning what it held.
    pub fn open(dir: &Path) -> io::Result<(Wal, Vec<(Key, Register)>)> {
        fs::create_dir_all(dir)?;
        let path = dir.join("policy.log");
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)?.read_to_end(&mut bytes)?;
        }
        let (records, good) = replay(&bytes);
        if good < bytes.len() {
            tracing::warn!(path = %path.display(), cut = bytes.len() - good, "policy log had a torn tail; cut it off");
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(good as u64)?;
            f.sync_all()?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok((Wal { path, file, bytes: good as u64 }, records))
    }

    /// Appends records; with `sync`, returns only once they are on disk.
    pub fn append(&mut self, records: &[(Key, Register)], sync: bool) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for (k, r) in records {
            buf.extend(encode(k, r));
        }
        self.file.write_all(&buf)?;
        if sync {
            self.file.sync_data()?;
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Rewrites the log as exactly `live` when it has grown past twice that.
    pub fn maybe_compact<'a>(&mut self, live: impl Iterator<Item = (&'a Key, &'a Register)>) -> io::Result<bool> {
        let snapshot: Vec<u8> = live.flat_map(|(k, r)| encode(k, r)).collect();
        if self.bytes < COMPACT_MIN_BYTES || self.bytes < 2 * snapshot.len() as u64 {
            return Ok(false);
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&snapshot)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.bytes = snapshot.len() as u64;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::policy::model::Kind;
    use trellis_core::policy::store::{Value, Version};

    fn rec(i: u64) -> (Key, Register) {
        let key = Key { kind: Kind::Services, name: format!("s{i}") };
        (
            key,
            Register {
                val: Value {
                    body: Some("{}".into()),
                    ancestors: Default::default(),
                    proof: i.is_multiple_of(2).then(|| WriterProof {
                        cert: vec![i as u8; 3],
                        scheme: 0x0403,
                        sig: vec![7; 70],
                    }),
                },
                marker: Version { hlc: i, node: 1 },
            },
        )
    }

    fn dir(tag: &str) -> crate::test_dir::TestDir {
        crate::test_dir::TestDir::new(&format!("wal-{tag}"))
    }

    #[test]
    fn records_survive_reopen() {
        let d = dir("reopen");
        let (mut w, got) = Wal::open(&d).unwrap();
        assert!(got.is_empty());
        w.append(&[rec(1), rec(2)], true).unwrap();
        drop(w);
        let (_, got) = Wal::open(&d).unwrap();
        assert_eq!(got, vec![rec(1), rec(2)]);
    }

    #[test]
    fn records_of_the_format_without_proofs_are_still_read() {
        let d = dir("v1");
        fs::create_dir_all(&d).unwrap();
        let (k, r) = rec(1);
        let body = bincode::serde::encode_to_vec((&k, &r), bincode::config::standard()).unwrap();
        let mut old = (body.len() as u32).to_le_bytes().to_vec();
        old.extend(crc32fast::hash(&body).to_le_bytes());
        old.extend(body);
        fs::write(d.join("policy.log"), old).unwrap();
        let (mut w, got) = Wal::open(&d).unwrap();
        assert_eq!(got, vec![rec(1)]);
        w.append(&[rec(2)], true).unwrap();
        drop(w);
        let (_, got) = Wal::open(&d).unwrap();
        assert_eq!(got, vec![rec(1), rec(2)], "the proof of record 2 survives");
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_kept() {
        let d = dir("torn");
        let (mut w, _) = Wal::open(&d).unwrap();
        w.append(&[rec(1), rec(2)], true).unwrap();
        drop(w);
        // A crash in the middle of the third record, then garbage.
        let mut f = OpenOptions::new().append(true).open(d.join("policy.log")).unwrap();
        let third = encode(&rec(3).0, &rec(3).1);
        f.write_all(&third[..third.len() / 2]).unwrap();
        drop(f);
        let (mut w, got) = Wal::open(&d).unwrap();
        assert_eq!(got, vec![rec(1), rec(2)]);
        w.append(&[rec(4)], true).unwrap();
        drop(w);
        let (_, got) = Wal::open(&d).unwrap();
        assert_eq!(got, vec![rec(1), rec(2), rec(4)]);
    }

    #[test]
    fn flipped_bit_stops_replay_at_that_record() {
        let d = dir("crc");
        let (mut w, _) = Wal::open(&d).unwrap();
        w.append(&[rec(1), rec(2)], true).unwrap();
        drop(w);
        let p = d.join("policy.log");
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&p, bytes).unwrap();
        let (_, got) = Wal::open(&d).unwrap();
        assert_eq!(got, vec![rec(1)]);
    }
}
