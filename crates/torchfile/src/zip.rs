//! The zip container: a streaming STORED-only zip writer that aligns every record's data to 64
//! bytes (padding the local header's extra field with an `FB` block, as torch does) and switches
//! to zip64 when a size or offset needs it; and a bounds-checked central-directory reader.

use std::collections::HashMap;
use std::io::{self, Seek, SeekFrom, Write};

pub(crate) const ALIGNMENT: u64 = 64;
const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const LOCATOR_SIG: u32 = 0x0706_4b50;
const U32_MAX: u64 = 0xFFFF_FFFF;
/// DOS date 1980-01-01, time 00:00 (fixed, so files are reproducible).
const DOS_DATE: u16 = 0x0021;

struct Entry {
    name: String,
    size: u64,
    crc: u32,
    offset: u64,
}

struct Open {
    name: String,
    size: u64,
    written: u64,
    offset: u64,
    hasher: crc32fast::Hasher,
}

/// Streams a STORED zip archive. Sizes are declared when an entry begins (they are known from the
/// storage's numel); the CRC is patched into the local header when the archive is finished.
pub(crate) struct ZipWriter<W: Write + Seek> {
    out: W,
    pos: u64,
    entries: Vec<Entry>,
    crc_patches: Vec<(u64, u32)>,
    open: Option<Open>,
    pub(crate) force_zip64: bool,
}

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

impl<W: Write + Seek> ZipWriter<W> {
    pub(crate) fn new(out: W, force_zip64: bool) -> Self {
        ZipWriter { out, pos: 0, entries: Vec::new(), crc_patches: Vec::new(), open: None, force_zip64 }
    }

    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes the local header of an entry of `size` bytes; `crc` is `Some` when already known.
    fn local_header(&mut self, name: &str, size: u64, crc: Option<u32>) -> io::Result<()> {
        let zip64 = self.force_zip64 || size >= U32_MAX;
        let offset = self.pos;
        let mut extra = Vec::new();
        if zip64 {
            put16(&mut extra, 0x0001);
            put16(&mut extra, 16);
            put64(&mut extra, size);
            put64(&mut extra, size);
        }
        let before = offset + 30 + name.len() as u64 + extra.len() as u64;
        let mut pad = (ALIGNMENT - before % ALIGNMENT) % ALIGNMENT;
        if pad > 0 && pad < 4 {
            pad += ALIGNMENT;
        }
        if pad > 0 {
            put16(&mut extra, u16::from_le_bytes(*b"FB"));
            put16(&mut extra, (pad - 4) as u16);
            extra.resize(extra.len() + (pad - 4) as usize, b'Z');
        }
        let mut h = Vec::with_capacity(30 + name.len() + extra.len());
        put32(&mut h, LOCAL_SIG);
        put16(&mut h, if zip64 { 45 } else { 20 });
        put16(&mut h, 0); // flags: no data descriptor, no encryption
        put16(&mut h, 0); // STORED
        put16(&mut h, 0);
        put16(&mut h, DOS_DATE);
        put32(&mut h, crc.unwrap_or(0));
        let small = if zip64 { U32_MAX as u32 } else { size as u32 };
        put32(&mut h, small);
        put32(&mut h, small);
        put16(&mut h, name.len() as u16);
        put16(&mut h, extra.len() as u16);
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        if crc.is_none() {
            self.crc_patches.push((offset + 14, 0));
        }
        self.emit(&h)?;
        debug_assert_eq!(self.pos % ALIGNMENT, 0);
        Ok(())
    }

    /// A whole small record at once.
    pub(crate) fn add_record(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        assert!(self.open.is_none(), "add_record while an entry is open");
        let crc = crc32fast::hash(data);
        let offset = self.pos;
        self.local_header(name, data.len() as u64, Some(crc))?;
        self.emit(data)?;
        self.entries.push(Entry { name: name.to_string(), size: data.len() as u64, crc, offset });
        Ok(())
    }

    pub(crate) fn begin_entry(&mut self, name: &str, size: u64) -> io::Result<()> {
        assert!(self.open.is_none(), "begin_entry while an entry is open");
        let offset = self.pos;
        self.local_header(name, size, None)?;
        self.open = Some(Open { name: name.to_string(), size, written: 0, offset, hasher: crc32fast::Hasher::new() });
        Ok(())
    }

    /// Bytes still expected by the open entry.
    pub(crate) fn remaining(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.size - o.written)
    }

    pub(crate) fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        let open = self.open.as_mut().expect("write_data without an open entry");
        assert!(data.len() as u64 <= open.size - open.written);
        open.hasher.update(data);
        open.written += data.len() as u64;
        self.out.write_all(data)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    pub(crate) fn end_entry(&mut self) {
        let open = self.open.take().expect("end_entry without an open entry");
        assert_eq!(open.written, open.size);
        let crc = open.hasher.finalize();
        let patch = self.crc_patches.last_mut().expect("patch slot");
        debug_assert_eq!(patch.0, open.offset + 14);
        patch.1 = crc;
        self.entries.push(Entry { name: open.name, size: open.size, crc, offset: open.offset });
    }

    /// Central directory and end records; then the CRC patches. Returns the sink and the file size.
    pub(crate) fn finish(mut self) -> io::Result<(W, u64)> {
        assert!(self.open.is_none(), "finish while an entry is open");
        let cd_offset = self.pos;
        let mut cd = Vec::new();
        for e in &self.entries {
            let big_size = self.force_zip64 || e.size >= U32_MAX;
            let big_off = self.force_zip64 || e.offset >= U32_MAX;
            let mut extra = Vec::new();
            if big_size || big_off {
                put16(&mut extra, 0x0001);
                put16(&mut extra, if big_size { 16 } else { 0 } + if big_off { 8 } else { 0 });
                if big_size {
                    put64(&mut extra, e.size);
                    put64(&mut extra, e.size);
                }
                if big_off {
                    put64(&mut extra, e.offset);
                }
            }
            let zip64 = !extra.is_empty();
            put32(&mut cd, CENTRAL_SIG);
            put16(&mut cd, 45); // made by: 4.5, MS-DOS
            put16(&mut cd, if zip64 { 45 } else { 20 });
            put16(&mut cd, 0);
            put16(&mut cd, 0);
            put16(&mut cd, 0);
            put16(&mut cd, DOS_DATE);
            put32(&mut cd, e.crc);
            let s = if big_size { U32_MAX as u32 } else { e.size as u32 };
            put32(&mut cd, s);
            put32(&mut cd, s);
            put16(&mut cd, e.name.len() as u16);
            put16(&mut cd, extra.len() as u16);
            put16(&mut cd, 0); // comment
            put16(&mut cd, 0); // disk
            put16(&mut cd, 0); // internal attrs
            put32(&mut cd, 0); // external attrs
            put32(&mut cd, if big_off { U32_MAX as u32 } else { e.offset as u32 });
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let cd_size = cd.len() as u64;
        let n = self.entries.len() as u64;
        let need64 = self.force_zip64 || n >= 0xFFFF || cd_size >= U32_MAX || cd_offset >= U32_MAX;
        let mut tail = cd;
        if need64 {
            let eocd64_offset = cd_offset + cd_size;
            put32(&mut tail, EOCD64_SIG);
            put64(&mut tail, 44);
            put16(&mut tail, 45);
            put16(&mut tail, 45);
            put32(&mut tail, 0);
            put32(&mut tail, 0);
            put64(&mut tail, n);
            put64(&mut tail, n);
            put64(&mut tail, cd_size);
            put64(&mut tail, cd_offset);
            put32(&mut tail, LOCATOR_SIG);
            put32(&mut tail, 0);
            put64(&mut tail, eocd64_offset);
            put32(&mut tail, 1);
        }
        put32(&mut tail, EOCD_SIG);
        put16(&mut tail, 0);
        put16(&mut tail, 0);
        let n16 = if need64 { 0xFFFF } else { n as u16 };
        put16(&mut tail, n16);
        put16(&mut tail, n16);
        put32(&mut tail, if need64 { U32_MAX as u32 } else { cd_size as u32 });
        put32(&mut tail, if need64 { U32_MAX as u32 } else { cd_offset as u32 });
        put16(&mut tail, 0);
        self.emit(&tail)?;
        let end = self.pos;
        for &(at, crc) in &self.crc_patches {
            self.out.seek(SeekFrom::Start(at))?;
            self.out.write_all(&crc.to_le_bytes())?;
        }
        self.out.seek(SeekFrom::Start(end))?;
        self.out.flush()?;
        Ok((self.out, end))
    }
}

/// Writes an archive of whole records under `prefix/` (test support for hand-made files).
pub fn write_raw_archive(path: &std::path::Path, prefix: &str, records: &[(&str, &[u8])]) -> io::Result<()> {
    let f = std::fs::File::create(path)?;
    let mut z = ZipWriter::new(io::BufWriter::new(f), false);
    for (name, data) in records {
        z.add_record(&format!("{prefix}/{name}"), data)?;
    }
    let (w, _) = z.finish()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// One record of a parsed archive: where its bytes are in the file.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub offset: usize,
    pub size: usize,
    pub crc: u32,
}

#[derive(Debug)]
pub(crate) struct Archive {
    pub prefix: String,
    pub records: HashMap<String, Record>,
    /// Record names in central-directory order.
    pub names: Vec<String>,
}

fn rd16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at.checked_add(2).ok_or("offset overflow")?)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("truncated: need 2 bytes at {at}, file has {}", b.len()))
}
fn rd32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at.checked_add(4).ok_or("offset overflow")?)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("truncated: need 4 bytes at {at}, file has {}", b.len()))
}
fn rd64(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at.checked_add(8).ok_or("offset overflow")?)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("truncated: need 8 bytes at {at}, file has {}", b.len()))
}
fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in memory addresses"))
}

/// Parses the central directory of `b` (the whole file).
pub(crate) fn parse_archive(b: &[u8]) -> Result<Archive, String> {
    if b.len() < 22 {
        return Err(format!("file is {} bytes, too short for a zip", b.len()));
    }
    // Find the end of central directory record: the last signature whose comment ends the file.
    let lowest = b.len().saturating_sub(22 + 0xFFFF);
    let mut eocd = None;
    let mut i = b.len() - 22;
    loop {
        if rd32(b, i)? == EOCD_SIG && i + 22 + rd16(b, i + 20)? as usize == b.len() {
            eocd = Some(i);
            break;
        }
        if i == lowest {
            break;
        }
        i -= 1;
    }
    let eocd = eocd.ok_or("no end-of-central-directory record (truncated or not a zip)")?;
    let mut count = rd16(b, eocd + 10)? as u64;
    let mut cd_size = rd32(b, eocd + 12)? as u64;
    let mut cd_offset = rd32(b, eocd + 16)? as u64;
    if eocd >= 20 && rd32(b, eocd - 20)? == LOCATOR_SIG {
        let at = to_usize(rd64(b, eocd - 20 + 8)?, "zip64 end record offset")?;
        if rd32(b, at)? != EOCD64_SIG {
            return Err(format!("zip64 locator points at {at}, which is no zip64 end record"));
        }
        count = rd64(b, at + 32)?;
        cd_size = rd64(b, at + 40)?;
        cd_offset = rd64(b, at + 48)?;
    } else if count == 0xFFFF || cd_size == U32_MAX || cd_offset == U32_MAX {
        return Err("end record says zip64 but there is no zip64 locator".into());
    }
    let cd_start = to_usize(cd_offset, "central directory offset")?;
    let cd_end = cd_start
        .checked_add(to_usize(cd_size, "central directory size")?)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| {
            format!(
                "central directory ({cd_size} bytes at {cd_offset}) runs past the end of the file ({} bytes)",
                b.len()
            )
        })?;
    if count > cd_size / 46 {
        return Err(format!("{count} entries cannot fit in a {cd_size}-byte central directory"));
    }
    let mut names = Vec::with_capacity(count as usize);
    let mut records = HashMap::with_capacity(count as usize);
    let mut prefix: Option<String> = None;
    let mut p = cd_start;
    for idx in 0..count {
        if p + 46 > cd_end || rd32(b, p)? != CENTRAL_SIG {
            return Err(format!("central directory entry {idx} at {p} is malformed"));
        }
        let flags = rd16(b, p + 8)?;
        let method = rd16(b, p + 10)?;
        let crc = rd32(b, p + 16)?;
        let mut comp = rd32(b, p + 20)? as u64;
        let mut size = rd32(b, p + 24)? as u64;
        let name_len = rd16(b, p + 28)? as usize;
        let extra_len = rd16(b, p + 30)? as usize;
        let comment_len = rd16(b, p + 32)? as usize;
        let mut offset = rd32(b, p + 42)? as u64;
        let name_at = p + 46;
        let extra_at = name_at + name_len;
        let next = extra_at + extra_len + comment_len;
        if next > cd_end {
            return Err(format!("central directory entry {idx} runs past the directory"));
        }
        let name = std::str::from_utf8(&b[name_at..extra_at])
            .map_err(|_| format!("entry {idx} has a non-UTF-8 name"))?
            .to_string();
        // zip64 extra: only the fields whose fixed value is 0xFFFFFFFF, in this order.
        let mut q = extra_at;
        while q + 4 <= extra_at + extra_len {
            let id = rd16(b, q)?;
            let len = rd16(b, q + 2)? as usize;
            let body = q + 4;
            if body + len > extra_at + extra_len {
                return Err(format!("{name}: extra field runs past its entry"));
            }
            if id == 0x0001 {
                let mut f = body;
                for v in [&mut size, &mut comp, &mut offset] {
                    if *v == U32_MAX {
                        if f + 8 > body + len {
                            return Err(format!("{name}: zip64 extra field too short"));
                        }
                        *v = rd64(b, f)?;
                        f += 8;
                    }
                }
            }
            q = body + len;
        }
        if flags & 1 != 0 {
            return Err(format!("{name}: encrypted entries are not supported"));
        }
        if method != 0 {
            return Err(format!("{name}: compression method {method}; torch.save archives are STORED (0)"));
        }
        if comp != size {
            return Err(format!("{name}: stored entry with compressed size {comp} != size {size}"));
        }
        let lh = to_usize(offset, "local header offset")?;
        if rd32(b, lh)? != LOCAL_SIG {
            return Err(format!("{name}: no local header at offset {lh}"));
        }
        let data_offset = lh + 30 + rd16(b, lh + 26)? as usize + rd16(b, lh + 28)? as usize;
        let size = to_usize(size, "entry size")?;
        if data_offset.checked_add(size).is_none_or(|e| e > b.len()) {
            return Err(format!(
                "{name}: {size} bytes at offset {data_offset} run past the end of the file ({} bytes; truncated?)",
                b.len()
            ));
        }
        let (top, rest) =
            name.split_once('/').ok_or_else(|| format!("entry {name:?} is not under a top-level folder"))?;
        match &prefix {
            None => prefix = Some(top.to_string()),
            Some(pf) if pf == top => {}
            Some(pf) => return Err(format!("entries under two top-level folders: {pf:?} and {top:?}")),
        }
        if records.insert(rest.to_string(), Record { offset: data_offset, size, crc }).is_some() {
            return Err(format!("duplicate entry {name:?}"));
        }
        names.push(rest.to_string());
        p = next;
    }
    Ok(Archive { prefix: prefix.ok_or("the archive has no entries")?, records, names })
}
