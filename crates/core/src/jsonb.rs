//! `encrypted_jsonb`'s plaintext: PostgreSQL's internal jsonb, checked before PostgreSQL reads it.
//!
//! Since the eleventh session an `encrypted_jsonb` value holds the document as PostgreSQL keeps
//! it in a plain jsonb column (the varlena's data, without its 4-byte header), behind a two-byte
//! marker: `0x00` (never the first byte of jsonb's text form, which is what older values hold:
//! they decrypt as before, forever), then the byte order the form was written in (`0x01`
//! little-endian, `0x02` big-endian: the internal form is native-endian). Decryption then
//! needs no parse: the plaintext is the result.
//!
//! PostgreSQL trusts its on-disk jsonb: offsets and lengths are followed without bounds checks.
//! An authenticated plaintext is not proof of a well-formed one: whoever holds a tenant's key
//! (a BYOK customer who unwraps it in its own KMS, a dump of a backend's memory) can make any
//! payload of that tenant. So every internal payload is checked here, completely, before a byte
//! of it reaches PostgreSQL: [`check_native`] (or [`check_foreign`], which also rewrites a
//! payload of the other byte order in place) accepts exactly what PostgreSQL's writer
//! (`convertToJsonb`, utils/adt/jsonb_util.c, the same format since 9.4 and in 15-18) produces
//! for a valid document, and refuses everything else:
//!
//! * container headers: an object, an array, or at the root only a one-element "raw scalar"
//!   array; no other flag bits;
//! * every JEntry: a known type; the end offset stored in every 32nd child (`JB_OFFSET_STRIDE`,
//!   counted across an object's keys then values) and a length in the others, exactly as the
//!   writer stores them; every child inside its container; no bytes after the last child;
//! * the zero padding (`INTALIGN`) before numerics and nested containers;
//! * object keys: strings, strictly increasing by (length, bytes) (sorted and unique, which the
//!   binary search of `getKeyJsonValueFromContainer` relies on);
//! * strings: no NUL byte and valid in the server encoding (a caller-supplied check);
//! * numerics: a 4-byte uncompressed varlena header whose length is the entry's, the short form
//!   exactly when `make_result` would choose it, no NaN or infinity (jsonb has none), digits
//!   below 10,000, no leading or trailing zero digit, zero with weight 0 and a positive sign, no
//!   stored fractional digit beyond the display scale (`dscale`: PostgreSQL keeps the digits
//!   within it, and its text output, equality and GIN keys disagree about a value that breaks
//!   this; insider review 69);
//! * booleans and nulls with no data;
//! * at most [`MAX_BODY`] bytes, [`MAX_ELEMS`] elements in an array and [`MAX_PAIRS`] pairs in
//!   an object: the limits PostgreSQL's writer enforces (a larger forged document would read
//!   within bounds but could not be dumped, restored or replicated once copied into a plain
//!   column; insider review 70);
//! * nesting at most [`MAX_DEPTH`] levels: PostgreSQL's own writer and parser stop at its stack
//!   limit (10,000-20,000 levels at the default `max_stack_depth`), so a deeper forged document
//!   could be stored in a plain column but never restored from a dump or replicated (review 69).
//!   The checks use a work list, not recursion.
//!
//! The encryption side runs the same check on the document it is given and stores the text
//! form instead when it fails (a document from an older PostgreSQL can hold a long-form numeric
//! the current writer would make short; a document deeper than [`MAX_DEPTH`]), so nothing is
//! written that the reader refuses. Text-form plaintexts are checked too before `jsonb_in`
//! parses them ([`text_form_ok`]): PostgreSQL's JSON lexer copies string bytes without checking
//! the server encoding.
//!
//! [`model`] is a reference reader and writer of the format (for the tests and the fuzz target:
//! whatever the check accepts must decode and re-encode to the same bytes).
//!
//! Two paths check the same rules. The general one (`walk`, `container`, `numeric`) reads
//! through `Body` (which rewrites a foreign-order body as it reads it) and serves every
//! container. A container of this machine's byte order with at most `JB_OFFSET_STRIDE` children
//! (what most documents are made of; the root itself when it is such an object or array) takes
//! `small`, written over its data's bytes: the writer then stores the end offset in the first
//! child only, so the offset flags are counted, every field is a length, and one comparison of
//! their sum with the container's room replaces the per-child bounds rules; its numerics go
//! through `numeric_bytes`. The tests and the fuzz target run every input through both paths
//! and the reference (`GENERAL_ONLY`).

/// First byte of an internal-form payload (jsonb's text form never starts with it).
pub const MARKER: u8 = 0x00;
/// The deepest nesting accepted in the internal form (the root container is level 1).
pub const MAX_DEPTH: u32 = 10_000;
/// The largest document PostgreSQL's writer makes: a container's total size must fit a JEntry's
/// 28-bit length (`JENTRY_OFFLENMASK`, checked by `convertJsonbArray`/`convertJsonbObject`);
/// nested containers are bounded by their entries, the root only by this.
pub const MAX_BODY: usize = 0x0FFF_FFFF;
/// The most elements an array may hold (`JSONB_MAX_ELEMS`: MaxAllocSize / sizeof(JsonbValue),
/// 32 bytes on 64-bit PostgreSQL 15-18) and pairs an object may hold (`JSONB_MAX_PAIRS`:
/// MaxAllocSize / sizeof(JsonbPair), 72 bytes), which `appendElement` and `appendKey` enforce.
pub const MAX_ELEMS: usize = 0x3FFF_FFFF / 32;
pub const MAX_PAIRS: usize = 0x3FFF_FFFF / 72;
/// Marker and byte-order byte.
pub const PREFIX_LEN: usize = 2;

const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;
const JENTRY_ISCONTAINER: u32 = 0x5000_0000;
const JB_OFFSET_STRIDE: usize = 32;
const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;
const JB_FARRAY: u32 = 0x4000_0000;

use crate::numeric::{
    fraction_digits, short_fits, NBASE, NUMERIC_DSCALE_MASK, NUMERIC_NEG, NUMERIC_SHORT, NUMERIC_SHORT_DSCALE_MASK,
    NUMERIC_SHORT_DSCALE_SHIFT, NUMERIC_SHORT_SIGN_MASK, NUMERIC_SHORT_WEIGHT_MASK, NUMERIC_SHORT_WEIGHT_SIGN_MASK,
    NUMERIC_SIGN_MASK, NUMERIC_SPECIAL,
};
const VARHDRSZ: usize = 4;

/// The byte order of an internal-form payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Little,
    Big,
}

impl Order {
    /// This machine's.
    pub const HOST: Order = if cfg!(target_endian = "little") { Order::Little } else { Order::Big };

    /// The byte after [`MARKER`] for a payload in this order.
    pub const fn form_byte(self) -> u8 {
        match self {
            Order::Little => 0x01,
            Order::Big => 0x02,
        }
    }

    fn u32(self, b: [u8; 4]) -> u32 {
        match self {
            Order::Little => u32::from_le_bytes(b),
            Order::Big => u32::from_be_bytes(b),
        }
    }

    fn put_u32(self, v: u32) -> [u8; 4] {
        match self {
            Order::Little => v.to_le_bytes(),
            Order::Big => v.to_be_bytes(),
        }
    }

    fn put_u16(self, v: u16) -> [u8; 2] {
        match self {
            Order::Little => v.to_le_bytes(),
            Order::Big => v.to_be_bytes(),
        }
    }

    /// The length in a 4-byte uncompressed varlena header (`VARATT_IS_4B_U`, `VARSIZE_4B`), or
    /// `None` for any other kind of header.
    #[inline(always)]
    fn varlena_4b_u(self, b: [u8; 4]) -> Option<u32> {
        match self {
            Order::Little => {
                let h = u32::from_le_bytes(b);
                (h & 0x3 == 0).then_some(h >> 2)
            }
            Order::Big => {
                let h = u32::from_be_bytes(b);
                (h & 0xC000_0000 == 0).then_some(h & 0x3FFF_FFFF)
            }
        }
    }

    fn put_varlena_4b_u(self, len: u32) -> [u8; 4] {
        match self {
            Order::Little => (len << 2).to_le_bytes(),
            Order::Big => (len & 0x3FFF_FFFF).to_be_bytes(),
        }
    }
}

/// What a decrypted `encrypted_jsonb` plaintext holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Form {
    /// jsonb's text form (values written before the internal form existed).
    Text,
    /// The internal form in this byte order, after [`PREFIX_LEN`] bytes.
    Internal(Order),
}

/// Refused: not a well-formed document. Says nothing about why (the bytes are plaintext).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid;

/// The form of a decrypted plaintext, from its first bytes.
pub fn form(plain: &[u8]) -> Result<Form, Invalid> {
    match plain {
        [MARKER, 0x01, ..] => Ok(Form::Internal(Order::Little)),
        [MARKER, 0x02, ..] => Ok(Form::Internal(Order::Big)),
        [MARKER, ..] => Err(Invalid),
        _ => Ok(Form::Text),
    }
}

/// Whether `s` is a jsonb string in a UTF-8 database: valid UTF-8, no NUL.
#[inline]
pub fn utf8_string(s: &[u8]) -> bool {
    std::str::from_utf8(s).is_ok() && !s.contains(&0)
}

/// Whether a text-form plaintext may go to `jsonb_in`: no NUL (which would cut the C string
/// short) and valid in the server encoding as a whole (`jsonb_in` copies string bytes as they
/// are; its escapes always produce valid characters), so that every string of the parsed
/// document is.
pub fn text_form_ok(plain: &[u8], string_ok: &mut impl FnMut(&[u8]) -> bool) -> bool {
    valid_string(plain, string_ok)
}

/// Whether a string's bytes are valid in the server encoding with no NUL: ASCII without NUL
/// answers at once (every server encoding PostgreSQL has is an ASCII superset, whose verifiers
/// accept bytes 0x01-0x7F as characters), anything else goes to the caller's check. The ASCII
/// scan is a branch-free fold the compiler vectorises: a call to the full validators costs
/// ~70-100 instructions for a short string.
#[inline(always)]
fn valid_string(s: &[u8], string_ok: &mut impl FnMut(&[u8]) -> bool) -> bool {
    ascii_without_nul(s) || (!s.contains(&0) && string_ok(s))
}

/// Whether every byte is in 0x01-0x7F, a word at a time: a high bit, or a zero byte by the
/// classic `(w - 0x01..) & !w & 0x80..` test (exact as a yes/no). Strings of 4 bytes or more
/// are covered by whole words plus one last word that overlaps the one before it; shorter
/// ones bytewise. Most keys and many values are a few bytes long.
/// The bytes of `w` that are 0x00 or above 0x7F, as their high bits (`bad8`, `bad4`).
#[inline(always)]
fn bad8(w: [u8; 8]) -> u64 {
    let w = u64::from_ne_bytes(w);
    (w | (w.wrapping_sub(0x0101_0101_0101_0101) & !w)) & 0x8080_8080_8080_8080
}

#[inline(always)]
fn bad4(w: [u8; 4]) -> u32 {
    let w = u32::from_ne_bytes(w);
    (w | (w.wrapping_sub(0x0101_0101) & !w)) & 0x8080_8080
}

#[inline(always)]
fn ascii_without_nul(s: &[u8]) -> bool {
    // Tested longest first: most keys' runs and many strings are 4-16 bytes.
    let n = s.len();
    if n > 8 {
        if n > 16 {
            return ascii_without_nul_long(s);
        }
        let (first, last) = (s.first_chunk::<8>(), s.last_chunk::<8>());
        matches!((first, last), (Some(f), Some(l)) if bad8(*f) | bad8(*l) == 0)
    } else if n >= 4 {
        let (first, last) = (s.first_chunk::<4>(), s.last_chunk::<4>());
        matches!((first, last), (Some(f), Some(l)) if bad4(*f) | bad4(*l) == 0)
    } else {
        s.iter().all(|&c| c.wrapping_sub(1) < 0x7F)
    }
}

/// [`ascii_without_nul`] for more than 16 bytes: out of line, so that its loop's constants are
/// not set up in every caller for the short strings most are.
#[inline(never)]
fn ascii_without_nul_long(s: &[u8]) -> bool {
    let (words, _) = s.as_chunks::<8>();
    let mut bad = 0u64;
    for w in words {
        bad |= bad8(*w);
    }
    bad == 0 && s.last_chunk::<8>().is_some_and(|l| bad8(*l) == 0)
}

/// Checks an internal-form body in this machine's byte order (read only).
/// `string_ok` says whether a string's bytes are valid in the server encoding (NUL bytes are
/// refused before it is asked).
#[inline(always)]
pub fn check_native<F: FnMut(&[u8]) -> bool>(body: &[u8], string_ok: &mut F) -> Result<(), Invalid> {
    // A root object or array of at most `JB_OFFSET_STRIDE` entries (most documents) goes
    // straight to `small`; anything else (a root scalar, a bigger root) through `walk`.
    let Some((header, rest)) = body.split_first_chunk::<4>() else { return Err(Invalid) };
    if body.len() > MAX_BODY {
        return Err(Invalid);
    }
    let header = u32::from_ne_bytes(*header);
    let count = (header & JB_CMASK) as usize;
    let keys = match header & !JB_CMASK {
        JB_FOBJECT if count <= JB_OFFSET_STRIDE / 2 => count,
        JB_FARRAY if count <= JB_OFFSET_STRIDE => 0,
        _ => return walk(&mut Native(body), string_ok),
    };
    if general_only() {
        return walk(&mut Native(body), string_ok);
    }
    let Some((entries, data)) = rest.split_at_checked(4 * (count + keys)) else { return Err(Invalid) };
    let (entries, _) = entries.as_chunks::<4>();
    let mut work = WorkList { one: None, spill: Vec::new() };
    small(data, 4 + 4 * (count + keys), entries, keys, 1, &mut work, string_ok)?;
    if work.one.is_none() {
        return Ok(());
    }
    nested(&mut Native(body), work, string_ok)
}

/// Checks an internal-form body written in byte order `from` and rewrites it, in place, in this
/// machine's. On `Err` the body may be partly rewritten (the caller discards it).
pub fn check_foreign<F: FnMut(&[u8]) -> bool>(body: &mut [u8], from: Order, string_ok: &mut F) -> Result<(), Invalid> {
    if from == Order::HOST {
        return check_native(body, string_ok);
    }
    walk(&mut Foreign(body, from), string_ok)
}

/// Reads of the body's fixed-size fields: each field is read exactly once, which lets
/// [`Foreign`] rewrite it in place as it reads it.
trait Body<'a> {
    fn len(&self) -> usize;
    fn bytes(&self, at: usize, end: usize) -> Result<&[u8], Invalid>;
    fn u32(&mut self, at: usize) -> Result<u32, Invalid>;
    fn varlena_4b_u(&mut self, at: usize) -> Result<u32, Invalid>;
    /// The `N`-byte integers at `at..end` (a container's JEntries, a numeric's digits) in this
    /// machine's byte order, each read once: the body's own bytes for [`Native`] (no copy), a
    /// wiped-on-drop copy of the rewritten ones for [`Foreign`] (they are plaintext).
    type Ints: AsRef<[u8]>;
    fn ints<const N: usize>(&mut self, at: usize, end: usize) -> Result<Self::Ints, Invalid>;
    /// The body itself when it is in this machine's byte order (nothing to rewrite): what
    /// [`small`] reads.
    fn native(&self) -> Option<&'a [u8]>;
}

#[inline(always)]
fn field<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], Invalid> {
    b.get(at..).and_then(|s| s.first_chunk::<N>()).copied().ok_or(Invalid)
}

struct Native<'a>(&'a [u8]);

impl<'a> Body<'a> for Native<'a> {
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn bytes(&self, at: usize, end: usize) -> Result<&[u8], Invalid> {
        self.0.get(at..end).ok_or(Invalid)
    }
    #[inline(always)]
    fn u32(&mut self, at: usize) -> Result<u32, Invalid> {
        Ok(u32::from_ne_bytes(field(self.0, at)?))
    }
    #[inline(always)]
    fn varlena_4b_u(&mut self, at: usize) -> Result<u32, Invalid> {
        Order::HOST.varlena_4b_u(field(self.0, at)?).ok_or(Invalid)
    }
    type Ints = &'a [u8];
    #[inline(always)]
    fn ints<const N: usize>(&mut self, at: usize, end: usize) -> Result<&'a [u8], Invalid> {
        let body: &'a [u8] = self.0;
        body.get(at..end).ok_or(Invalid)
    }
    #[inline(always)]
    fn native(&self) -> Option<&'a [u8]> {
        Some(self.0)
    }
}

struct Foreign<'a>(&'a mut [u8], Order);

impl Foreign<'_> {
    fn put<const N: usize>(&mut self, at: usize, v: [u8; N]) {
        self.0[at..at + N].copy_from_slice(&v);
    }
}

impl<'a> Body<'a> for Foreign<'a> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self, at: usize, end: usize) -> Result<&[u8], Invalid> {
        self.0.get(at..end).ok_or(Invalid)
    }
    fn u32(&mut self, at: usize) -> Result<u32, Invalid> {
        let v = self.1.u32(field(self.0, at)?);
        self.put(at, Order::HOST.put_u32(v));
        Ok(v)
    }
    fn varlena_4b_u(&mut self, at: usize) -> Result<u32, Invalid> {
        let len = self.1.varlena_4b_u(field(self.0, at)?).ok_or(Invalid)?;
        self.put(at, Order::HOST.put_varlena_4b_u(len));
        Ok(len)
    }
    type Ints = zeroize::Zeroizing<Vec<u8>>;
    fn ints<const N: usize>(&mut self, at: usize, end: usize) -> Result<Self::Ints, Invalid> {
        let e = self.0.get_mut(at..end).ok_or(Invalid)?;
        // The other order is this one's byte reversal (`check_foreign` never makes a `Foreign`
        // of this machine's order): each integer's bytes reversed in place.
        for w in e.chunks_exact_mut(N) {
            w.reverse();
        }
        Ok(zeroize::Zeroizing::new(e.to_vec()))
    }
    fn native(&self) -> Option<&'a [u8]> {
        None
    }
}

/// A container still to check: its bytes in the body and its nesting level.
#[derive(Clone, Copy)]
struct Pending {
    start: usize,
    end: usize,
    depth: u32,
}

/// Containers still to check: one inline (a document's root usually holds at most one nested
/// container at a time worth keeping apart), the rest on the heap, allocated only for documents
/// with more than one nested container.
struct WorkList {
    one: Option<Pending>,
    spill: Vec<Pending>,
}

impl WorkList {
    #[inline]
    fn push(&mut self, c: Pending) {
        if self.one.is_none() {
            self.one = Some(c);
        } else {
            self.spill.push(c);
        }
    }
    #[inline]
    fn pop(&mut self) -> Option<Pending> {
        self.spill.pop().or_else(|| self.one.take())
    }
}

#[inline]
fn walk<'a, B: Body<'a>, F: FnMut(&[u8]) -> bool>(b: &mut B, string_ok: &mut F) -> Result<(), Invalid> {
    if b.len() > MAX_BODY {
        return Err(Invalid);
    }
    // The root is the only container at depth 1; the containers nested in it, if any, are
    // checked after it passed, by `nested` (out of line: most documents have none).
    let mut work = WorkList { one: None, spill: Vec::new() };
    container(b, Pending { start: 0, end: b.len(), depth: 1 }, &mut work, string_ok)?;
    if work.one.is_none() {
        return Ok(());
    }
    nested(b, work, string_ok)
}

#[inline(never)]
fn nested<'a, B: Body<'a>, F: FnMut(&[u8]) -> bool>(b: &mut B, mut work: WorkList, string_ok: &mut F) -> Result<(), Invalid> {
    while let Some(p) = work.pop() {
        container(b, p, &mut work, string_ok)?;
    }
    Ok(())
}

/// Bytes of zero padding before a numeric or container at `off` (relative to its container's
/// data, which starts 4-aligned): `INTALIGN(off) - off`.
#[inline]
fn pad(off: usize) -> usize {
    (4 - (off & 3)) & 3
}

/// Checks the container at `start..end` (its own bytes exactly, padding excluded): its header,
/// every child's entry and scalar data; nested containers go on the work list (checked only
/// after this one passed: `walk` stops at the first refusal).
#[inline(always)]
fn container<'a, B: Body<'a>, F: FnMut(&[u8]) -> bool>(
    b: &mut B,
    Pending { start, end, depth }: Pending,
    work: &mut WorkList,
    string_ok: &mut F,
) -> Result<(), Invalid> {
    let root = depth == 1;
    if end.checked_sub(start).ok_or(Invalid)? < 4 {
        return Err(Invalid);
    }
    let header = b.u32(start)?;
    let count = (header & JB_CMASK) as usize;
    let (object, scalar) = match header & !JB_CMASK {
        JB_FOBJECT => (true, false),
        JB_FARRAY => (false, false),
        f if f == JB_FARRAY | JB_FSCALAR && root && count == 1 => (false, true),
        _ => return Err(Invalid),
    };
    if count > if object { MAX_PAIRS } else { MAX_ELEMS } {
        return Err(Invalid);
    }
    let n = if object { count * 2 } else { count };
    // Every entry is 4 bytes inside the container (checked before any is read: `n` is at most
    // 2^29, so this cannot overflow).
    let base = start + 4 + 4 * n;
    if base > end {
        return Err(Invalid);
    }
    let room = end - base;
    let entries = b.ints::<4>(start + 4, base)?;
    let (entries, _) = entries.as_ref().as_chunks::<4>();
    if scalar {
        // A root scalar: its one entry holds the end offset (the first child always does),
        // which is the container's end.
        let je = u32::from_ne_bytes(entries[0]);
        if je & JENTRY_HAS_OFF == 0 || (je & JENTRY_OFFLENMASK) as usize != room {
            return Err(Invalid);
        }
        return value(b, je, base, 0, room, None, string_ok);
    }
    if n <= JB_OFFSET_STRIDE && !general_only() {
        if let Some(body) = b.native() {
            let data = body.get(base..end).ok_or(Invalid)?;
            return small(data, base, entries, if object { count } else { 0 }, depth, work, string_ok);
        }
    }
    // Every child's end: the stored end offset in every 32nd child (`JB_OFFSET_STRIDE`, counted
    // across an object's keys then values) and a length in the others, exactly as the writer
    // stores them; ends that never decrease and stay inside the container (the last one its
    // end, checked after the values). Rules are folded into `bad` and tested once per child.
    let mut bad = false;
    let mut off = 0usize;
    let (keys, values) = entries.split_at(if object { count } else { 0 });
    // An object's keys: strings, strictly increasing by (length, bytes), as
    // lengthCompareJsonbString orders them. Their bytes are one run (strings are not padded),
    // checked at once when it is ASCII, key by key otherwise.
    let mut prev_len = 0usize;
    for (i, w) in keys.iter().enumerate() {
        let je = u32::from_ne_bytes(*w);
        let e = child_end(je, off);
        let len = e.wrapping_sub(off);
        bad |= ((je & JENTRY_HAS_OFF != 0) != (i % JB_OFFSET_STRIDE == 0))
            | (e < off)
            | (je & JENTRY_TYPEMASK != JENTRY_ISSTRING)
            | (i > 0 && len < prev_len);
        if bad {
            return Err(Invalid);
        }
        if i > 0 && len == prev_len && b.bytes(base + off - len, base + off)? >= b.bytes(base + off, base + e)? {
            return Err(Invalid);
        }
        prev_len = len;
        off = e;
    }
    if off > room {
        return Err(Invalid);
    }
    if object {
        key_strings(b.bytes(base, base + off)?, keys, string_ok)?;
    }
    // Values and array elements.
    let nested = if depth >= MAX_DEPTH { None } else { Some((&mut *work, depth + 1)) };
    let mut nested = nested;
    for (i, w) in values.iter().enumerate() {
        let je = u32::from_ne_bytes(*w);
        let e = child_end(je, off);
        if ((je & JENTRY_HAS_OFF != 0) != ((keys.len() + i) % JB_OFFSET_STRIDE == 0)) | (e < off) | (e > room) {
            return Err(Invalid);
        }
        value(b, je, base, off, e, nested.as_mut().map(|(w, d)| (&mut **w, *d)), string_ok)?;
        off = e;
    }
    if off != room {
        return Err(Invalid);
    }
    Ok(())
}

/// The tests and the fuzz target (`fuzzing::jsonb`, also replayed in the core tier) check every
/// small container both ways: through [`small`] and through the general path (insider review
/// 73: the fuzz target compared the check with the reference reader only).
#[cfg(not(any(test, fuzzing)))]
#[inline(always)]
fn general_only() -> bool {
    false
}

#[cfg(any(test, fuzzing))]
thread_local! {
    pub(crate) static GENERAL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(any(test, fuzzing))]
fn general_only() -> bool {
    GENERAL_ONLY.with(|g| g.get())
}

/// [`container`] for at most [`JB_OFFSET_STRIDE`] children, what most documents' containers
/// hold: the writer stores the end offset in the first child only and a length in the others,
/// so every child's end is the running sum of the stored fields, ends cannot decrease, and the
/// last one equal to the container's end puts every child inside it. The general path's
/// per-child rules (the offset flag, ends that never decrease, inside the container) become a
/// count of offset flags and one comparison at the end; a child whose bytes are read before
/// that comparison is still inside the body (every read is bounds-checked), and a refusal
/// discards everything. Accepts exactly what the general path accepts (the tests run both).
#[inline(always)]
fn small<F: FnMut(&[u8]) -> bool>(
    data: &[u8],
    base: usize,
    entries: &[[u8; 4]],
    keys: usize,
    depth: u32,
    work: &mut WorkList,
    string_ok: &mut F,
) -> Result<(), Invalid> {
    debug_assert!(entries.len() <= JB_OFFSET_STRIDE && keys <= entries.len());
    if entries.is_empty() {
        return if data.is_empty() { Ok(()) } else { Err(Invalid) };
    }
    let (keys, values) = entries.split_at(keys);
    // The offset flag: on the first entry (an object's first key, an array's first element)
    // and no other. Keys are strings (type 0): an object's keys other than the first are
    // folded into `rest` and tested once; values count their flags into `offsets`.
    let mut off = 0usize;
    let mut offsets = 0u32;
    if let Some((k0, others)) = keys.split_first() {
        let je = u32::from_ne_bytes(*k0);
        if je & (JENTRY_HAS_OFF | JENTRY_TYPEMASK) != JENTRY_HAS_OFF {
            return Err(Invalid);
        }
        let mut prev_len = (je & JENTRY_OFFLENMASK) as usize;
        let mut rest = 0u32;
        off = prev_len;
        for w in others {
            let je = u32::from_ne_bytes(*w);
            rest |= je;
            let len = (je & JENTRY_OFFLENMASK) as usize;
            // Strictly increasing by (length, bytes), as lengthCompareJsonbString orders them.
            if len <= prev_len && (len < prev_len || data.get(off - len..off).ok_or(Invalid)? >= data.get(off..off + len).ok_or(Invalid)?) {
                return Err(Invalid);
            }
            prev_len = len;
            off += len;
        }
        if rest & (JENTRY_HAS_OFF | JENTRY_TYPEMASK) != 0 {
            return Err(Invalid);
        }
        key_strings(data.get(..off).ok_or(Invalid)?, keys, string_ok)?;
        // The values' flags are all clear: counted as if the first key's were among them.
        offsets = 1;
    }
    for w in values {
        let je = u32::from_ne_bytes(*w);
        offsets += je >> 31;
        let e = off + (je & JENTRY_OFFLENMASK) as usize;
        let child = data.get(off..e).ok_or(Invalid)?;
        let kind = je & JENTRY_TYPEMASK;
        if kind == JENTRY_ISSTRING {
            if !valid_string(child, string_ok) {
                return Err(Invalid);
            }
        } else if kind == JENTRY_ISNUMERIC || kind == JENTRY_ISCONTAINER {
            let p = pad(off);
            let (zeros, rest) = child.split_at_checked(p).ok_or(Invalid)?;
            if zeros.iter().any(|&z| z != 0) {
                return Err(Invalid);
            }
            if kind == JENTRY_ISNUMERIC {
                numeric_bytes(rest)?;
            } else if depth < MAX_DEPTH {
                work.push(Pending { start: base + off + p, end: base + e, depth: depth + 1 });
            } else {
                return Err(Invalid);
            }
        } else if kind > JENTRY_ISNULL || !child.is_empty() {
            // Booleans and null have no bytes; anything above null but a container is no type.
            return Err(Invalid);
        }
        off = e;
    }
    if offsets != 1 || off != data.len() || values.first().is_some_and(|w| keys.is_empty() && u32::from_ne_bytes(*w) & JENTRY_HAS_OFF == 0) {
        return Err(Invalid);
    }
    Ok(())
}

/// [`numeric`] over its bytes in this machine's order (what [`small`] reads): the same rules,
/// written separately (the tests and the fuzz target compare the two paths).
#[inline(always)]
fn numeric_bytes(n: &[u8]) -> Result<(), Invalid> {
    // A 4-byte varlena header holding the length, then 2-byte words (the header word, the long
    // form's weight, the digits). `n` is at most MAX_BODY bytes: its length fits the header.
    let Some((hdr, rest)) = n.split_first_chunk::<4>() else { return Err(Invalid) };
    let Some((h, tail)) = rest.split_first_chunk::<2>() else { return Err(Invalid) };
    if !n.len().is_multiple_of(2) || *hdr != Order::HOST.put_varlena_4b_u(n.len() as u32) {
        return Err(Invalid);
    }
    let (words, _) = tail.as_chunks::<2>();
    let h = u16::from_ne_bytes(*h);
    let (negative, dscale, weight, digits) = if h & NUMERIC_SIGN_MASK == NUMERIC_SHORT {
        let w = (h & NUMERIC_SHORT_WEIGHT_MASK) as i32;
        let weight = if h & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 { w - 64 } else { w };
        (h & NUMERIC_SHORT_SIGN_MASK != 0, (h & NUMERIC_SHORT_DSCALE_MASK) >> NUMERIC_SHORT_DSCALE_SHIFT, weight, words)
    } else if h & NUMERIC_SIGN_MASK == NUMERIC_SPECIAL {
        return Err(Invalid); // NaN and the infinities: jsonb holds none
    } else {
        let Some((w, digits)) = words.split_first() else { return Err(Invalid) };
        let weight = u16::from_ne_bytes(*w) as i16 as i32;
        let dscale = h & NUMERIC_DSCALE_MASK;
        // make_result writes the long form only when the short one cannot hold the value.
        if short_fits(dscale, weight) {
            return Err(Invalid);
        }
        (h & NUMERIC_SIGN_MASK == NUMERIC_NEG, dscale, weight, digits)
    };
    let Some((&first, inner)) = digits.split_first() else {
        // Zero: make_result gives it weight 0 and a positive sign.
        return if weight == 0 && !negative { Ok(()) } else { Err(Invalid) };
    };
    let last = inner.last().copied().unwrap_or(first);
    let (first, last) = (u16::from_ne_bytes(first), u16::from_ne_bytes(last));
    // Digits below NBASE, the first and the last not zero (1..=9999), the ones between any.
    if first.wrapping_sub(1) >= NBASE - 1 || last.wrapping_sub(1) >= NBASE - 1 {
        return Err(Invalid);
    }
    if let Some((_, between)) = inner.split_last() {
        for d in between {
            if u16::from_ne_bytes(*d) >= NBASE {
                return Err(Invalid);
            }
        }
    }
    if fraction_digits(weight, digits.len(), last) > dscale as i64 {
        return Err(Invalid);
    }
    Ok(())
}

/// An object's keys, whose bytes are `run` (their ends already checked to lie in it): valid
/// strings. Keys are not padded, so their bytes are one run, checked at once when it is ASCII
/// without NUL (most keys), key by key otherwise. Shared by [`container`] and [`small`].
#[inline(always)]
fn key_strings<F: FnMut(&[u8]) -> bool>(run: &[u8], keys: &[[u8; 4]], string_ok: &mut F) -> Result<(), Invalid> {
    if ascii_without_nul(run) {
        return Ok(());
    }
    let mut at = 0;
    for w in keys {
        let e = child_end(u32::from_ne_bytes(*w), at);
        if !valid_string(run.get(at..e).ok_or(Invalid)?, string_ok) {
            return Err(Invalid);
        }
        at = e;
    }
    Ok(())
}

/// Checks one value or array element at `base + off .. base + end` (inside its container):
/// a string, a numeric, a boolean or null, or a nested container (pushed on `nested`'s work
/// list, at its depth; `None` where none may be: under a root scalar, or at the depth limit).
#[inline(always)]
fn value<'a, B: Body<'a>, F: FnMut(&[u8]) -> bool>(
    b: &mut B,
    je: u32,
    base: usize,
    off: usize,
    end: usize,
    nested: Option<(&mut WorkList, u32)>,
    string_ok: &mut F,
) -> Result<(), Invalid> {
    let (at, child_end) = (base + off, base + end);
    match je & JENTRY_TYPEMASK {
        JENTRY_ISSTRING => {
            if !valid_string(b.bytes(at, child_end)?, string_ok) {
                return Err(Invalid);
            }
        }
        kind @ (JENTRY_ISNUMERIC | JENTRY_ISCONTAINER) => {
            let p = pad(off);
            if p > 0 && (end - off < p || b.bytes(at, at + p)?.iter().any(|&z| z != 0)) {
                return Err(Invalid);
            }
            if kind == JENTRY_ISNUMERIC {
                numeric(b, at + p, child_end)?;
            } else if let Some((work, depth)) = nested {
                work.push(Pending { start: at + p, end: child_end, depth });
            } else {
                return Err(Invalid);
            }
        }
        JENTRY_ISBOOL_FALSE | JENTRY_ISBOOL_TRUE | JENTRY_ISNULL => {
            if end != off {
                return Err(Invalid);
            }
        }
        _ => return Err(Invalid),
    }
    Ok(())
}

/// The end (relative to its container's data) of a child whose entry is `je` and which starts
/// at `off`: the stored end offset, or `off` plus the stored length (`off` is at most `n`
/// times 2^28 with `n` below 2^30: no overflow on a 64-bit machine, which PostgreSQL 15-18's
/// jsonb limits assume too).
#[inline(always)]
fn child_end(je: u32, off: usize) -> usize {
    let f = (je & JENTRY_OFFLENMASK) as usize;
    if je & JENTRY_HAS_OFF != 0 {
        f
    } else {
        off + f
    }
}

/// Checks a numeric at `at..end`: as `make_result` (utils/adt/numeric.c) writes a finite value.
/// After its 4-byte varlena header a numeric is 2-byte integers only (the header word, the long
/// form's weight, the digits), read as one run.
#[inline(always)]
fn numeric<'a, B: Body<'a>>(b: &mut B, at: usize, end: usize) -> Result<(), Invalid> {
    let size = end.checked_sub(at).ok_or(Invalid)?;
    if size < VARHDRSZ + 2 || size % 2 != 0 || b.varlena_4b_u(at)? as usize != size {
        return Err(Invalid);
    }
    let words = b.ints::<2>(at + VARHDRSZ, end)?;
    let (words, _) = words.as_ref().as_chunks::<2>();
    let h = u16::from_ne_bytes(words[0]);
    let (negative, dscale, weight, digits) = if h & NUMERIC_SIGN_MASK == NUMERIC_SPECIAL {
        return Err(Invalid); // NaN and the infinities: jsonb holds none
    } else if h & NUMERIC_SHORT != 0 {
        let w = (h & NUMERIC_SHORT_WEIGHT_MASK) as i32;
        let weight = if h & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 { w - 64 } else { w };
        (h & NUMERIC_SHORT_SIGN_MASK != 0, (h & NUMERIC_SHORT_DSCALE_MASK) >> NUMERIC_SHORT_DSCALE_SHIFT, weight, &words[1..])
    } else {
        let Some(w) = words.get(1) else { return Err(Invalid) };
        let weight = u16::from_ne_bytes(*w) as i16 as i32;
        let (negative, dscale) = (h & NUMERIC_SIGN_MASK == NUMERIC_NEG, h & NUMERIC_DSCALE_MASK);
        // make_result writes the long form only when the short one cannot hold the value.
        if short_fits(dscale, weight) {
            return Err(Invalid);
        }
        (negative, dscale, weight, &words[2..])
    };
    let (Some(first), Some(last)) = (digits.first(), digits.last()) else {
        // Zero: make_result gives it weight 0 and a positive sign.
        return if weight == 0 && !negative { Ok(()) } else { Err(Invalid) };
    };
    let (first, last) = (u16::from_ne_bytes(*first), u16::from_ne_bytes(*last));
    // Digits below NBASE, no leading or trailing zero digit.
    let mut bad = first == 0 || last == 0;
    for d in digits {
        bad |= u16::from_ne_bytes(*d) >= NBASE;
    }
    if bad || fraction_digits(weight, digits.len(), last) > dscale as i64 {
        return Err(Invalid);
    }
    Ok(())
}

/// A reference model of the format: a document tree, PostgreSQL's writer (canonical: object
/// keys sorted and unique, the short numeric form where it fits) and a reader that follows
/// PostgreSQL's reader (`getJsonbOffset`, `fillJsonbValue`) with every read bounds-checked and
/// no other check. For tests and the fuzz target; not on any per-value path.
pub mod model {
    use super::*;

    /// A finite numeric as `make_result` keeps it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Numeric {
        pub negative: bool,
        pub weight: i16,
        pub dscale: u16,
        pub digits: Vec<u16>,
    }

    impl Numeric {
        /// The smallest display scale that shows every stored digit.
        pub fn min_dscale(&self) -> u16 {
            match self.digits.last() {
                Some(&last) if last != 0 => fraction_digits(self.weight as i32, self.digits.len(), last).clamp(0, NUMERIC_DSCALE_MASK as i64) as u16,
                _ => 0,
            }
        }
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Value {
        Null,
        Bool(bool),
        Str(Vec<u8>),
        Num(Numeric),
        Array(Vec<Value>),
        /// Pairs in any order; [`encode`] sorts them and keeps the last of equal keys (as
        /// PostgreSQL's `uniqueifyJsonbObject` does).
        Object(Vec<(Vec<u8>, Value)>),
    }

    /// The document's body (without the varlena header) as PostgreSQL writes it, in `order`.
    pub fn encode(v: &Value, order: Order) -> Vec<u8> {
        let mut buf = vec![0u8; VARHDRSZ];
        let root = match v {
            Value::Array(_) | Value::Object(_) => v.clone(),
            scalar => Value::Array(vec![scalar.clone()]),
        };
        let raw_scalar = !matches!(v, Value::Array(_) | Value::Object(_));
        container(&mut buf, &root, raw_scalar, order);
        buf.split_off(VARHDRSZ)
    }

    fn pad_buf(buf: &mut Vec<u8>) -> usize {
        // INTALIGN, restated (not the check's `pad`: insider review 73 asked for a model that
        // shares no rule with what it checks).
        let p = (4 - buf.len() % 4) % 4;
        buf.resize(buf.len() + p, 0);
        p
    }

    /// `NUMERIC_CAN_BE_SHORT` as utils/adt/numeric.c states it, restated from its constants
    /// (`NUMERIC_SHORT_DSCALE_MAX` 63, `NUMERIC_SHORT_WEIGHT_MAX` 63, `NUMERIC_SHORT_WEIGHT_MIN`
    /// -64), not the check's `numeric::short_fits`.
    fn can_be_short(dscale: u16, weight: i32) -> bool {
        dscale <= 63 && weight <= 63 && weight >= -64
    }

    /// How many decimal digits a finite numeric shows after the point with its trailing zeros
    /// cut: its digits written out in decimal, 4 per base-10,000 digit, the point after
    /// `weight + 1` of them, then counted (not the check's arithmetic `fraction_digits`).
    fn shown_fraction_digits(weight: i16, digits: &[u16]) -> usize {
        let mut fraction = "0000".repeat((-(weight as i32) - 1).max(0) as usize);
        for (i, d) in digits.iter().enumerate() {
            if i as i32 > weight as i32 {
                fraction.push_str(&format!("{d:04}"));
            }
        }
        fraction.trim_end_matches('0').len()
    }

    /// Appends a container; returns its entry's length (padding included).
    fn container(buf: &mut Vec<u8>, v: &Value, raw_scalar: bool, order: Order) -> u32 {
        let begin = buf.len();
        pad_buf(buf);
        let children: Vec<&Value>;
        let mut keys: Vec<(Vec<u8>, Value)> = Vec::new();
        let header = match v {
            Value::Array(items) => {
                children = items.iter().collect();
                items.len() as u32 | JB_FARRAY | if raw_scalar { JB_FSCALAR } else { 0 }
            }
            Value::Object(pairs) => {
                for (k, val) in pairs {
                    match keys.iter_mut().find(|(kk, _)| kk == k) {
                        Some(slot) => slot.1 = val.clone(),
                        None => keys.push((k.clone(), val.clone())),
                    }
                }
                keys.sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
                children = Vec::new();
                keys.len() as u32 | JB_FOBJECT
            }
            _ => unreachable!("containers only"),
        };
        buf.extend_from_slice(&order.put_u32(header));
        let key_strs: Vec<Value> = keys.iter().map(|(k, _)| Value::Str(k.clone())).collect();
        let all: Vec<&Value> = if let Value::Object(_) = v {
            key_strs.iter().chain(keys.iter().map(|(_, val)| val)).collect()
        } else {
            children
        };
        let entries_at = buf.len();
        buf.resize(buf.len() + 4 * all.len(), 0);
        let mut total = 0u32;
        for (i, child) in all.iter().enumerate() {
            let (kind, len) = match child {
                Value::Null => (JENTRY_ISNULL, 0),
                Value::Bool(false) => (JENTRY_ISBOOL_FALSE, 0),
                Value::Bool(true) => (JENTRY_ISBOOL_TRUE, 0),
                Value::Str(s) => {
                    buf.extend_from_slice(s);
                    (JENTRY_ISSTRING, s.len() as u32)
                }
                Value::Num(n) => {
                    let p = pad_buf(buf);
                    let bytes = numeric_bytes(n, order);
                    buf.extend_from_slice(&bytes);
                    (JENTRY_ISNUMERIC, (p + bytes.len()) as u32)
                }
                Value::Array(_) | Value::Object(_) => (JENTRY_ISCONTAINER, container(buf, child, false, order)),
            };
            total += len;
            let je = if i % JB_OFFSET_STRIDE == 0 { kind | total | JENTRY_HAS_OFF } else { kind | len };
            buf[entries_at + 4 * i..entries_at + 4 * i + 4].copy_from_slice(&order.put_u32(je));
        }
        (buf.len() - begin) as u32
    }

    /// A numeric's varlena (header included) as `make_result` writes it.
    pub fn numeric_bytes(n: &Numeric, order: Order) -> Vec<u8> {
        let (weight, negative) = if n.digits.is_empty() { (0, false) } else { (n.weight as i32, n.negative) };
        let mut out = vec![0u8; VARHDRSZ];
        if can_be_short(n.dscale, weight) {
            let h = NUMERIC_SHORT
                | if negative { NUMERIC_SHORT_SIGN_MASK } else { 0 }
                | (n.dscale << NUMERIC_SHORT_DSCALE_SHIFT)
                | if weight < 0 { NUMERIC_SHORT_WEIGHT_SIGN_MASK } else { 0 }
                | (weight as u16 & NUMERIC_SHORT_WEIGHT_MASK);
            out.extend_from_slice(&order.put_u16(h));
        } else {
            out.extend_from_slice(&order.put_u16(if negative { NUMERIC_NEG } else { 0 } | (n.dscale & NUMERIC_DSCALE_MASK)));
            out.extend_from_slice(&order.put_u16(weight as i16 as u16));
        }
        for d in &n.digits {
            out.extend_from_slice(&order.put_u16(*d));
        }
        let len = out.len() as u32;
        out[..4].copy_from_slice(&order.put_varlena_4b_u(len));
        out
    }

    /// Reads a body in this machine's byte order as PostgreSQL's reader would, every read
    /// bounds-checked; `None` where PostgreSQL would read outside the value or meet an entry
    /// type it does not know.
    pub fn decode(body: &[u8]) -> Option<Value> {
        let v = read_container(body, 0, body.len())?;
        match v {
            Value::Array(mut items) if u32::from_ne_bytes(field(body, 0).ok()?) & JB_FSCALAR != 0 => items.pop(),
            other => Some(other),
        }
    }

    fn read_container(body: &[u8], start: usize, end: usize) -> Option<Value> {
        let c = body.get(start..end)?;
        let header = u32::from_ne_bytes(field(c, 0).ok()?);
        let count = (header & JB_CMASK) as usize;
        let object = header & JB_FOBJECT != 0;
        let n = if object { count * 2 } else { count };
        let base = 4usize.checked_add(n.checked_mul(4)?)?;
        let je = |i: usize| field(c, 4 + 4 * i).ok().map(u32::from_ne_bytes);
        let mut out = Vec::with_capacity(n.min(1024));
        for i in 0..n {
            // getJsonbOffset and getJsonbLength.
            let mut off = 0u32;
            for j in (0..i).rev() {
                let e = je(j)?;
                off = off.wrapping_add(e & JENTRY_OFFLENMASK);
                if e & JENTRY_HAS_OFF != 0 {
                    break;
                }
            }
            let e = je(i)?;
            let len = if e & JENTRY_HAS_OFF != 0 { (e & JENTRY_OFFLENMASK).wrapping_sub(off) } else { e & JENTRY_OFFLENMASK };
            let at = base.checked_add(off as usize)?;
            let data_end = at.checked_add(len as usize)?;
            let v = match e & JENTRY_TYPEMASK {
                JENTRY_ISNULL => Value::Null,
                JENTRY_ISBOOL_FALSE => Value::Bool(false),
                JENTRY_ISBOOL_TRUE => Value::Bool(true),
                JENTRY_ISSTRING => Value::Str(c.get(at..data_end)?.to_vec()),
                JENTRY_ISNUMERIC => Value::Num(read_numeric(c.get(at + pad(off as usize)..data_end)?)?),
                JENTRY_ISCONTAINER => read_container(c, at + pad(off as usize), data_end)?,
                _ => return None,
            };
            out.push(v);
        }
        if object {
            let values = out.split_off(count);
            let mut pairs = Vec::with_capacity(count);
            for (k, v) in out.into_iter().zip(values) {
                let Value::Str(k) = k else { return None };
                pairs.push((k, v));
            }
            Some(Value::Object(pairs))
        } else {
            Some(Value::Array(out))
        }
    }

    /// A second opinion on a body in this machine's byte order, by another route than the
    /// check: read it as PostgreSQL's reader would ([`decode`]), check what a document may hold
    /// (strings without NUL and valid per `string_ok`, object keys strictly increasing by
    /// (length, bytes), numerics as `make_result` keeps them, the depth and size limits), then
    /// require that PostgreSQL's writer ([`encode`]) gives back exactly these bytes: the layout
    /// rules (entries, offsets, padding, header flags, the numeric forms, no trailing bytes)
    /// follow from that one comparison. The check must agree with it on every input (the tests
    /// and the fuzz target); it is slow, recursive, and for those only.
    pub fn reference_accepts(body: &[u8], string_ok: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        fn holds(v: &Value, depth: u32, string_ok: &mut dyn FnMut(&[u8]) -> bool) -> bool {
            let string = |s: &[u8], f: &mut dyn FnMut(&[u8]) -> bool| !s.contains(&0) && f(s);
            match v {
                Value::Null | Value::Bool(_) => true,
                Value::Str(s) => string(s, string_ok),
                Value::Num(n) => {
                    n.digits.iter().all(|&d| d < NBASE)
                        && match (n.digits.first(), n.digits.last()) {
                            // The unclamped count (insider review 71: `min_dscale` clamps to the
                            // largest display scale, which made this accept digits beyond it).
                            (Some(&f), Some(&l)) => f != 0 && l != 0 && shown_fraction_digits(n.weight, &n.digits) <= n.dscale as usize,
                            _ => n.weight == 0 && !n.negative,
                        }
                }
                Value::Array(items) => {
                    depth <= MAX_DEPTH && items.len() <= MAX_ELEMS && items.iter().all(|i| holds(i, depth + 1, string_ok))
                }
                Value::Object(pairs) => {
                    depth <= MAX_DEPTH
                        && pairs.len() <= MAX_PAIRS
                        && pairs.windows(2).all(|w| (w[0].0.len(), &w[0].0) < (w[1].0.len(), &w[1].0))
                        && pairs.iter().all(|(k, v)| string(k, string_ok) && holds(v, depth + 1, string_ok))
                }
            }
        }
        if body.len() > MAX_BODY {
            return false;
        }
        let Some(v) = decode(body) else { return false };
        holds(&v, 1, string_ok) && encode(&v, Order::HOST) == body
    }

    fn read_numeric(b: &[u8]) -> Option<Numeric> {
        let size = Order::HOST.varlena_4b_u(field(b, 0).ok()?)? as usize;
        let b = b.get(..size)?;
        let h = u16::from_ne_bytes(field(b, 4).ok()?);
        let (negative, dscale, weight, at) = if h & NUMERIC_SHORT != 0 {
            let w = (h & NUMERIC_SHORT_WEIGHT_MASK) as i16;
            let weight = if h & NUMERIC_SHORT_WEIGHT_SIGN_MASK != 0 { w - 64 } else { w };
            (h & NUMERIC_SHORT_SIGN_MASK != 0, (h & NUMERIC_SHORT_DSCALE_MASK) >> NUMERIC_SHORT_DSCALE_SHIFT, weight, 6)
        } else {
            (h & NUMERIC_SIGN_MASK == NUMERIC_NEG, h & NUMERIC_DSCALE_MASK, u16::from_ne_bytes(field(b, 6).ok()?) as i16, 8)
        };
        let digits = b.get(at..)?.chunks_exact(2).map(|d| u16::from_ne_bytes([d[0], d[1]])).collect();
        Some(Numeric { negative, weight, dscale, digits })
    }
}

#[cfg(test)]
mod tests {
    use super::model::{decode, encode, numeric_bytes, Numeric, Value};
    use super::*;
    use proptest::prelude::*;

    fn ok(s: &[u8]) -> bool {
        utf8_string(s)
    }

    fn num(negative: bool, weight: i16, dscale: u16, digits: &[u16]) -> Value {
        Value::Num(Numeric { negative, weight, dscale, digits: digits.to_vec() })
    }

    fn s(x: &str) -> Vec<u8> {
        x.as_bytes().to_vec()
    }

    /// `{"a": [1, 2.5]}` as PostgreSQL 15 stores it: the tuple's data read with pageinspect
    /// (`heap_page_items(get_raw_page(...))`) from a jsonb column with plain storage on this
    /// machine, without its 1-byte varlena header. The writer here must produce the same bytes.
    const A_1_2_5: &[u8] = &[
        0x01, 0x00, 0x00, 0x20, // object, 1 pair
        0x01, 0x00, 0x00, 0x80, // key: string, end offset 1
        0x21, 0x00, 0x00, 0x50, // value: container, length 33 (padding included)
        0x61, // "a"
        0x00, 0x00, 0x00, // padding
        0x02, 0x00, 0x00, 0x40, // array, 2 elements
        0x08, 0x00, 0x00, 0x90, // numeric, end offset 8
        0x0a, 0x00, 0x00, 0x10, // numeric, length 10
        0x20, 0x00, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, // 1: size 8, short, weight 0; digit 1
        0x28, 0x00, 0x00, 0x00, 0x80, 0x80, 0x02, 0x00, 0x88, 0x13, // 2.5: size 10, dscale 1; 2, 5000
    ];

    #[test]
    fn the_writer_matches_postgresqls_bytes_for_a_known_document() {
        let doc = Value::Object(vec![(s("a"), Value::Array(vec![num(false, 0, 0, &[1]), num(false, 0, 1, &[2, 5000])]))]);
        assert_eq!(encode(&doc, Order::Little), A_1_2_5);
        assert_eq!(check_native(A_1_2_5, &mut ok), Ok(()));
        assert_eq!(decode(A_1_2_5), Some(doc));
    }

    #[test]
    fn the_payload_form_is_read_from_its_first_two_bytes() {
        assert_eq!(form(b"{\"a\": 1}"), Ok(Form::Text));
        assert_eq!(form(b"\x00\x01...."), Ok(Form::Internal(Order::Little)));
        assert_eq!(form(b"\x00\x02...."), Ok(Form::Internal(Order::Big)));
        assert_eq!(form(b"\x00\x03...."), Err(Invalid));
        assert_eq!(form(b"\x00"), Err(Invalid));
        assert_eq!(form(b""), Ok(Form::Text));
    }

    fn sample() -> Value {
        // More than 32 children (offsets stored every 32nd), a long-form numeric, nesting,
        // an empty key, every scalar, a raw scalar below.
        let many: Vec<Value> = (1..=70u16).map(|i| if i % 3 == 0 { Value::Str(vec![b'x'; i as usize]) } else { num(i % 2 == 0, 0, 0, &[i]) }).collect();
        Value::Object(vec![
            (s("many"), Value::Array(many)),
            (s(""), Value::Null),
            (s("t"), Value::Bool(true)),
            (s("f"), Value::Bool(false)),
            (s("big"), num(true, 200, 3, &[12, 3400])),
            (s("tiny"), num(false, -70, 300, &[5])),
            (s("zero"), num(false, 0, 2, &[])),
            (s("nested"), Value::Object((0..40).map(|i| (format!("k{i:02}").into_bytes(), Value::Array(vec![Value::Object(vec![])]))).collect())),
            (s("ünï"), Value::Str(s("ćódé ✓"))),
        ])
    }

    #[test]
    fn a_document_of_every_kind_passes_and_round_trips() {
        for v in [sample(), Value::Null, Value::Str(s("x")), num(false, 0, 0, &[7]), Value::Array(vec![]), Value::Object(vec![])] {
            let body = encode(&v, Order::HOST);
            assert_eq!(check_native(&body, &mut ok), Ok(()), "{v:?}");
            assert_eq!(decode(&body), Some(v.clone()).map(|v| canonical(v)));
        }
    }

    fn canonical(v: Value) -> Value {
        decode(&encode(&v, Order::HOST)).unwrap()
    }

    #[test]
    fn a_foreign_byte_order_is_rewritten_to_this_machines() {
        let other = if Order::HOST == Order::Little { Order::Big } else { Order::Little };
        let native = encode(&sample(), Order::HOST);
        let mut foreign = encode(&sample(), other);
        assert_ne!(foreign, native);
        // Read as native, the foreign bytes are refused.
        assert_eq!(check_native(&foreign, &mut ok), Err(Invalid));
        assert_eq!(check_foreign(&mut foreign, other, &mut ok), Ok(()));
        assert_eq!(foreign, native);
    }

    /// Every single-byte change of a valid document is either refused or still a canonical
    /// document (one PostgreSQL's writer could have made, read back within bounds).
    #[test]
    fn every_one_byte_change_is_refused_or_canonical() {
        let body = encode(&sample(), Order::HOST);
        let mut accepted = 0;
        for i in 0..body.len() {
            for x in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
                let mut m = body.clone();
                m[i] ^= x;
                if check_native(&m, &mut ok).is_ok() {
                    accepted += 1;
                    let v = decode(&m).expect("accepted bodies read within bounds");
                    assert_eq!(encode(&v, Order::HOST), m, "accepted bodies are canonical");
                }
            }
        }
        // Some changes are harmless (a string's letter, a digit's value): not all are refused.
        assert!(accepted > 0);
    }

    /// The check and the model's second opinion (`reference_accepts`: read as PostgreSQL reads,
    /// check the document, write it back as PostgreSQL writes) agree on every one-, two- and
    /// three-byte change and every truncation of documents of every kind (review 70: the fuzz
    /// target alone could not see a wrong refusal, nor a wrong acceptance that re-encodes).
    #[test]
    fn the_check_agrees_with_the_reference_on_mutated_documents() {
        let docs = [
            sample(),
            Value::Object(vec![(s("a"), num(false, 0, 0, &[1])), (s("bb"), Value::Str(s("x"))), (s("cc"), Value::Array(vec![Value::Null, Value::Bool(true)]))]),
            Value::Array((0..40u16).map(|i| num(i % 2 == 0, i as i16 - 20, 80, &[i + 1])).collect()),
            num(true, -3, 12, &[7, 5000]),
            Value::Str(s("é")),
        ];
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut agreed, mut accepted) = (0u64, 0u64);
        for d in &docs {
            let body = encode(d, Order::HOST);
            let mut try_one = |m: &[u8]| {
                let a = check_native(m, &mut ok).is_ok();
                let r = model::reference_accepts(m, &mut ok);
                assert_eq!(a, r, "check {a}, reference {r}: {m:02x?}");
                // The small-container path and the general one agree.
                GENERAL_ONLY.with(|g| g.set(true));
                let general = check_native(m, &mut ok).is_ok();
                GENERAL_ONLY.with(|g| g.set(false));
                assert_eq!(a, general, "small-container path {a}, general path {general}: {m:02x?}");
                agreed += 1;
                accepted += a as u64;
            };
            try_one(&body);
            for n in 0..body.len() {
                try_one(&body[..n]);
            }
            for i in 0..body.len() {
                for x in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
                    let mut m = body.clone();
                    m[i] ^= x;
                    try_one(&m);
                }
            }
            for _ in 0..4_000 {
                let mut m = body.clone();
                for _ in 0..1 + next() % 3 {
                    let i = (next() % m.len() as u64) as usize;
                    m[i] = match next() % 4 {
                        0 => 0,
                        1 => m[i].wrapping_add(1),
                        2 => m[i].wrapping_sub(1),
                        _ => next() as u8,
                    };
                }
                try_one(&m);
            }
        }
        assert!(accepted > docs.len() as u64 && agreed > 30_000, "{accepted} accepted of {agreed}");
    }

    #[test]
    fn malformed_documents_are_refused() {
        let good = encode(&Value::Object(vec![(s("a"), num(false, 0, 0, &[1])), (s("bb"), Value::Str(s("x")))]), Order::HOST);
        assert_eq!(check_native(&good, &mut ok), Ok(()));
        let le = |v: u32| v.to_ne_bytes();
        let set = |b: &[u8], at: usize, v: [u8; 4]| {
            let mut b = b.to_vec();
            b[at..at + 4].copy_from_slice(&v);
            b
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated header", good[..3].to_vec()),
            ("a trailing byte", [good.clone(), vec![0]].concat()),
            ("one byte short", good[..good.len() - 1].to_vec()),
            ("unknown header flag", set(&good, 0, le(2 | JB_FOBJECT | 0x8000_0000))),
            ("object and array", set(&good, 0, le(2 | JB_FOBJECT | JB_FARRAY))),
            ("scalar flag on an object", set(&good, 0, le(2 | JB_FOBJECT | JB_FSCALAR))),
            ("more children than room", set(&good, 0, le(0x0FFF_FFFF | JB_FOBJECT))),
            ("a key that is not a string", set(&good, 4, le(JENTRY_ISNULL | JENTRY_HAS_OFF | 1))),
            ("an unknown entry type", set(&good, 12, le(0x6000_0000 | 8))),
            ("a length past the end", set(&good, 12, le(JENTRY_ISNUMERIC | 0x0FFF_FFF0))),
            ("an offset where a length belongs", set(&good, 8, le(JENTRY_ISSTRING | JENTRY_HAS_OFF | 3))),
            ("a length where an offset belongs", set(&good, 4, le(JENTRY_ISSTRING | 1))),
        ];
        for (what, b) in cases {
            assert_eq!(check_native(&b, &mut ok), Err(Invalid), "{what}");
        }
        // Keys out of order, and a duplicate key: written by hand (the writer sorts).
        let ab = encode(&Value::Object(vec![(s("a"), Value::Null), (s("b"), Value::Null)]), Order::HOST);
        let mut ba = ab.clone();
        let keys = ab.len() - 2;
        ba[keys] = b'b';
        ba[keys + 1] = b'a';
        assert_eq!(check_native(&ba, &mut ok), Err(Invalid), "unsorted keys");
        ba[keys] = b'a';
        ba[keys + 1] = b'a';
        assert_eq!(check_native(&ba, &mut ok), Err(Invalid), "a duplicate key");
        // A raw scalar that is not at the root, or holds a container, or two elements.
        let nested_scalar = {
            let mut b = encode(&Value::Array(vec![Value::Array(vec![Value::Null])]), Order::HOST);
            // The inner array's header is at 8: flag it a raw scalar.
            b[8..12].copy_from_slice(&le(1 | JB_FARRAY | JB_FSCALAR));
            b
        };
        assert_eq!(check_native(&nested_scalar, &mut ok), Err(Invalid), "a nested raw scalar");
        let mut scalar_container = encode(&Value::Array(vec![Value::Array(vec![])]), Order::HOST);
        scalar_container[0..4].copy_from_slice(&le(1 | JB_FARRAY | JB_FSCALAR));
        assert_eq!(check_native(&scalar_container, &mut ok), Err(Invalid), "a raw scalar holding a container");
        let mut two = encode(&Value::Array(vec![Value::Null, Value::Null]), Order::HOST);
        two[0..4].copy_from_slice(&le(2 | JB_FARRAY | JB_FSCALAR));
        assert_eq!(check_native(&two, &mut ok), Err(Invalid), "a raw scalar of two elements");
        // Strings: a NUL, invalid UTF-8, and what the caller's encoding check refuses.
        for bad in [&b"a\0b"[..], b"\xff", b"\xed\xa0\x80"] {
            let b = encode(&Value::Str(bad.to_vec()), Order::HOST);
            assert_eq!(check_native(&b, &mut ok), Err(Invalid), "string {bad:?}");
        }
        let b = encode(&Value::Str(s("fïne")), Order::HOST);
        assert_eq!(check_native(&b, &mut |_| false), Err(Invalid), "the encoding check is asked");
        // ASCII without NUL is valid in every server encoding: not asked.
        let b = encode(&Value::Str(s("fine")), Order::HOST);
        assert_eq!(check_native(&b, &mut |_| false), Ok(()), "ASCII needs no encoding check");
        // Non-zero padding before a numeric.
        let mut padded = encode(&Value::Array(vec![Value::Str(s("x")), num(false, 0, 0, &[1])]), Order::HOST);
        let pad_at = 4 + 8 + 1;
        assert_eq!(padded[pad_at], 0);
        padded[pad_at] = 1;
        assert_eq!(check_native(&padded, &mut ok), Err(Invalid), "padding that is not zero");
    }

    /// `[x, true]` and `{"a": x}` with `bytes` as `x`'s data (after its padding), entry type
    /// `kind`: bodies the small-container path reads (the tests compare it with the general one).
    fn in_small_containers(bytes: &[u8], kind: u32) -> [Vec<u8>; 2] {
        let e = |v: u32| v.to_ne_bytes();
        let mut array = Vec::new();
        array.extend_from_slice(&e(2 | JB_FARRAY));
        array.extend_from_slice(&e(kind | JENTRY_HAS_OFF | bytes.len() as u32));
        array.extend_from_slice(&e(JENTRY_ISBOOL_TRUE));
        array.extend_from_slice(bytes);
        let mut object = Vec::new();
        object.extend_from_slice(&e(1 | JB_FOBJECT));
        object.extend_from_slice(&e(JENTRY_ISSTRING | JENTRY_HAS_OFF | 1));
        object.extend_from_slice(&e(kind | (3 + bytes.len() as u32)));
        object.extend_from_slice(b"a\0\0\0");
        object.extend_from_slice(bytes);
        [array, object]
    }

    /// The offset flag on the first entry only, in containers of at most 32 children (the
    /// small-container path counts them): every pair of entries with both flags toggled, in
    /// objects and arrays, agrees with the general path and the reference, and only the
    /// untouched document passes (checked first).
    #[test]
    fn every_pair_of_toggled_offset_flags_is_refused_in_small_containers() {
        let docs = [
            Value::Object(vec![(s("a"), num(false, 0, 0, &[1])), (s("bb"), Value::Str(s("x"))), (s("cc"), Value::Bool(true)), (s("dd"), Value::Null)]),
            Value::Array(vec![num(false, 0, 0, &[1]), Value::Str(s("x")), Value::Bool(false), Value::Null, Value::Array(vec![])]),
        ];
        let mut tried = 0;
        for d in &docs {
            let body = encode(d, Order::HOST);
            let count = (u32::from_ne_bytes(body[..4].try_into().unwrap()) & JB_CMASK) as usize;
            let n = if matches!(d, Value::Object(_)) { count * 2 } else { count };
            assert_eq!(check_native(&body, &mut ok), Ok(()));
            for i in 0..n {
                for j in i..n {
                    let mut m = body.clone();
                    for k in if i == j { vec![i] } else { vec![i, j] } {
                        m[4 + 4 * k + if cfg!(target_endian = "little") { 3 } else { 0 }] ^= 0x80;
                    }
                    let a = check_native(&m, &mut ok).is_ok();
                    GENERAL_ONLY.with(|g| g.set(true));
                    let general = check_native(&m, &mut ok).is_ok();
                    GENERAL_ONLY.with(|g| g.set(false));
                    assert_eq!(a, general, "small {a}, general {general}: entries {i} and {j}");
                    assert_eq!(a, model::reference_accepts(&m, &mut ok), "entries {i} and {j}");
                    assert!(!a, "entries {i} and {j}");
                    tried += 1;
                }
            }
        }
        assert!(tried > 40);
    }

    #[test]
    fn numerics_are_refused_unless_make_result_could_have_written_them() {
        let body_of = |bytes: Vec<u8>| {
            // A raw scalar array holding one numeric entry with these bytes.
            let mut b = Vec::new();
            b.extend_from_slice(&(1 | JB_FARRAY | JB_FSCALAR).to_ne_bytes());
            b.extend_from_slice(&(JENTRY_ISNUMERIC | JENTRY_HAS_OFF | bytes.len() as u32).to_ne_bytes());
            b.extend_from_slice(&bytes);
            b
        };
        let n = |negative, weight, dscale, digits: &[u16]| Numeric { negative, weight, dscale, digits: digits.to_vec() };
        assert_eq!(check_native(&body_of(numeric_bytes(&n(false, 0, 0, &[1]), Order::HOST)), &mut ok), Ok(()));
        let h = Order::HOST;
        let mut nan = numeric_bytes(&n(false, 0, 0, &[]), h);
        nan[4..6].copy_from_slice(&h.put_u16(0xC000));
        let mut inf = nan.clone();
        inf[4..6].copy_from_slice(&h.put_u16(0xD000));
        let mut long_that_fits = vec![0u8; 4];
        long_that_fits.extend_from_slice(&h.put_u16(0));
        long_that_fits.extend_from_slice(&h.put_u16(0));
        long_that_fits.extend_from_slice(&h.put_u16(1));
        let l = long_that_fits.len() as u32;
        long_that_fits[..4].copy_from_slice(&h.put_varlena_4b_u(l));
        let mut short_header = numeric_bytes(&n(false, 0, 0, &[1]), h);
        short_header[0] = (6 << 1) | 1; // a 1-byte varlena header
        let mut wrong_size = numeric_bytes(&n(false, 0, 0, &[1]), h);
        wrong_size[..4].copy_from_slice(&h.put_varlena_4b_u(7));
        let cases = [
            ("NaN", nan),
            ("infinity", inf),
            ("the long form where the short fits", long_that_fits),
            ("a digit of 10000", numeric_bytes(&n(false, 0, 0, &[10_000]), h)),
            ("a middle digit of 10000", numeric_bytes(&n(false, 2, 0, &[1, 10_000, 1]), h)),
            ("a last digit of 10000", numeric_bytes(&n(false, 1, 0, &[1, 10_000]), h)),
            ("a leading zero digit", numeric_bytes(&n(false, 1, 0, &[0, 1]), h)),
            ("a trailing zero digit", numeric_bytes(&n(false, 1, 0, &[1, 0]), h)),
            ("a negative zero", {
                let mut z = numeric_bytes(&n(false, 0, 0, &[]), h);
                z[4..6].copy_from_slice(&h.put_u16(NUMERIC_SHORT | NUMERIC_SHORT_SIGN_MASK));
                z
            }),
            ("a zero with a weight", {
                let mut z = numeric_bytes(&n(false, 0, 0, &[]), h);
                z[4..6].copy_from_slice(&h.put_u16(NUMERIC_SHORT | 3));
                z
            }),
            ("a short varlena header", short_header),
            ("a size that is not the entry's", wrong_size),
            ("an odd number of digit bytes", [numeric_bytes(&n(false, 0, 0, &[1]), h), vec![0]].concat()),
        ];
        // An odd size that the varlena header and the entry both state (the case above has a
        // header that disagrees with its entry, refused for that alone).
        let mut odd = [numeric_bytes(&n(false, 0, 0, &[1]), h), vec![0]].concat();
        let l = odd.len() as u32;
        odd[..4].copy_from_slice(&h.put_varlena_4b_u(l));
        for (what, bytes) in cases.into_iter().chain([("an odd size, header and entry agreeing", odd)]) {
            // As a raw scalar (the general path) and as an array element and an object value
            // (both paths: `small` for containers of at most 32 children, and the general one).
            assert_eq!(check_native(&body_of(bytes.clone()), &mut ok), Err(Invalid), "{what}");
            for body in in_small_containers(&bytes, JENTRY_ISNUMERIC) {
                for general in [false, true] {
                    GENERAL_ONLY.with(|g| g.set(general));
                    let r = check_native(&body, &mut ok);
                    GENERAL_ONLY.with(|g| g.set(false));
                    assert_eq!(r, Err(Invalid), "{what} in a container (general path only: {general})");
                }
            }
        }
        // The wrapping itself is sound: a good numeric passes in it.
        for body in in_small_containers(&numeric_bytes(&n(false, 0, 0, &[1]), h), JENTRY_ISNUMERIC) {
            assert_eq!(check_native(&body, &mut ok), Ok(()));
        }
        // The long form where the short one cannot hold the value is fine.
        assert_eq!(check_native(&body_of(numeric_bytes(&n(false, 64, 0, &[1]), h)), &mut ok), Ok(()));
        assert_eq!(check_native(&body_of(numeric_bytes(&n(false, 0, 64, &[1]), h)), &mut ok), Ok(()));
    }

    #[test]
    fn nesting_is_accepted_to_max_depth_and_checked_without_recursion() {
        let depth = MAX_DEPTH as usize;
        assert_eq!(check_native(&encode_deep(depth), &mut ok), Ok(()));
        assert_eq!(check_native(&encode_deep(depth + 1), &mut ok), Err(Invalid), "one level too deep");
        // Far deeper (PostgreSQL's writer and parser stop at their stack limit): refused, with
        // no recursion here to overflow.
        assert_eq!(check_native(&encode_deep(1_000_000), &mut ok), Err(Invalid));
        // One level's entry changed deep inside: found.
        let body = encode_deep(depth);
        let mut bad = body.clone();
        let at = body.len() - 8 * 10;
        bad[at + 4] ^= 0x01;
        assert_eq!(check_native(&bad, &mut ok), Err(Invalid));
    }

    /// Review 70's F1: PostgreSQL's writer refuses a document over 2^28 - 1 bytes, an array of
    /// more than MAX_ELEMS elements and an object of more than MAX_PAIRS pairs; bodies that are
    /// otherwise well formed are refused at once (each would pass every other rule).
    #[test]
    fn documents_over_the_writers_size_limits_are_refused() {
        let h = Order::HOST;
        // A root array of one ASCII string filling the body to MAX_BODY + 1 bytes.
        let len = MAX_BODY + 1 - 8;
        let mut big = Vec::with_capacity(MAX_BODY + 1);
        big.extend_from_slice(&h.put_u32(1 | JB_FARRAY));
        big.extend_from_slice(&h.put_u32(JENTRY_ISSTRING | JENTRY_HAS_OFF | len as u32));
        big.resize(MAX_BODY + 1, b'a');
        assert_eq!(check_native(&big, &mut ok), Err(Invalid), "over MAX_BODY");
        drop(big);
        // MAX_ELEMS + 1 nulls (offsets every 32nd entry, as the writer stores them).
        let n = MAX_ELEMS + 1;
        let mut arr = Vec::with_capacity(4 + 4 * n);
        arr.extend_from_slice(&h.put_u32(n as u32 | JB_FARRAY));
        for i in 0..n {
            arr.extend_from_slice(&h.put_u32(if i % 32 == 0 { JENTRY_ISNULL | JENTRY_HAS_OFF } else { JENTRY_ISNULL }));
        }
        assert_eq!(check_native(&arr, &mut ok), Err(Invalid), "over MAX_ELEMS");
        drop(arr);
        // MAX_PAIRS + 1 pairs of distinct 5-byte keys in order (base 62), null values.
        let n = MAX_PAIRS + 1;
        let key = |i: usize| -> [u8; 5] {
            let d = |k: u32| b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"[(i / 62usize.pow(k)) % 62];
            [d(4), d(3), d(2), d(1), d(0)]
        };
        let mut obj = Vec::with_capacity(4 + 8 * n + 5 * n);
        obj.extend_from_slice(&h.put_u32(n as u32 | JB_FOBJECT));
        for i in 0..n {
            let end = 5 * (i + 1) as u32;
            obj.extend_from_slice(&h.put_u32(if i % 32 == 0 { JENTRY_ISSTRING | JENTRY_HAS_OFF | end } else { JENTRY_ISSTRING | 5 }));
        }
        for i in n..2 * n {
            obj.extend_from_slice(&h.put_u32(if i % 32 == 0 { JENTRY_ISNULL | JENTRY_HAS_OFF | (5 * n) as u32 } else { JENTRY_ISNULL }));
        }
        for i in 0..n {
            obj.extend_from_slice(&key(i));
        }
        assert!(key(n - 1) > key(n - 2) && 62usize.pow(5) > n);
        assert_eq!(check_native(&obj, &mut ok), Err(Invalid), "over MAX_PAIRS");
    }

    /// Review 69's F1: a numeric whose display scale hides stored digits (1.5 stored with
    /// dscale 0 prints as 1 but compares as 1.5, and GIN keys it by the text). Refused; the same
    /// digits with the display scale that shows them pass.
    #[test]
    fn a_numeric_with_digits_beyond_its_display_scale_is_refused() {
        let body_of = |n: &Numeric| {
            let bytes = numeric_bytes(n, Order::HOST);
            let mut b = Vec::new();
            b.extend_from_slice(&(1 | JB_FARRAY | JB_FSCALAR).to_ne_bytes());
            b.extend_from_slice(&(JENTRY_ISNUMERIC | JENTRY_HAS_OFF | bytes.len() as u32).to_ne_bytes());
            b.extend_from_slice(&bytes);
            b
        };
        let n = |weight, dscale, digits: &[u16]| Numeric { negative: false, weight, dscale, digits: digits.to_vec() };
        for (value, ok_at, digits, weight) in [
            ("1.5", 1, &[1u16, 5000][..], 0i16),
            ("0.0001", 4, &[1], -1),
            ("0.00012", 5, &[1, 2000], -1),
            ("1.0001", 4, &[1, 1], 0),
            ("5e-400", 400, &[5], -100),
        ] {
            assert_eq!(n(weight, ok_at, digits).min_dscale(), ok_at, "{value}");
            assert_eq!(check_native(&body_of(&n(weight, ok_at, digits)), &mut ok), Ok(()), "{value} at dscale {ok_at}");
            assert_eq!(check_native(&body_of(&n(weight, ok_at + 3, digits)), &mut ok), Ok(()), "{value} with more scale");
            assert_eq!(check_native(&body_of(&n(weight, ok_at - 1, digits)), &mut ok), Err(Invalid), "{value} at dscale {}", ok_at - 1);
        }
        // Integers and large weights need no scale at all.
        assert_eq!(check_native(&body_of(&n(3, 0, &[12, 3400])), &mut ok), Ok(()));
        assert_eq!(check_native(&body_of(&n(32767, 0, &[1])), &mut ok), Ok(()));
        // Review 71's F2: digits beyond even the largest display scale (16,383), which
        // PostgreSQL cannot write ('1e-16384'::jsonb is out of range): refused by the check and
        // by the reference alike (the reference compared against a clamped scale).
        for weight in [-4096i16, -4097, -4100, -32768] {
            let body = body_of(&n(weight, NUMERIC_DSCALE_MASK, &[1]));
            assert_eq!(check_native(&body, &mut ok), Err(Invalid), "weight {weight}");
            assert!(!model::reference_accepts(&body, &mut ok), "weight {weight}: the reference accepts it");
        }
    }

    #[test]
    fn the_ascii_fast_path_agrees_with_a_bytewise_check() {
        let bytewise = |s: &[u8]| s.iter().all(|&c| (1..=0x7F).contains(&c));
        let mut cases: Vec<Vec<u8>> = vec![vec![], b"a".to_vec(), b"12345678".to_vec(), b"123456789abcdefgh".to_vec()];
        // Every length through the bytewise, 4-byte, 8-byte and out-of-line branches and their
        // edges (review 74: lengths 2-6 and 10-15 were not covered).
        for len in 1usize..=40 {
            for at in 0..len {
                for bad in [0x00u8, 0x80, 0xff, 0x7f, 0x01] {
                    let mut v = vec![b'x'; len];
                    v[at] = bad;
                    cases.push(v);
                }
            }
        }
        for c in cases {
            assert_eq!(ascii_without_nul(&c), bytewise(&c), "{c:?}");
        }
    }

    #[test]
    fn a_text_form_plaintext_is_checked_before_the_parser() {
        assert!(text_form_ok(r#"{"a": "\u00e9t\u00e9", "b": "été"}"#.as_bytes(), &mut ok));
        assert!(!text_form_ok(b"{\"a\": \"\xf0\"}", &mut ok), "invalid UTF-8 inside a string");
        assert!(!text_form_ok(b"{\"a\": 1}\0{\"b\": 2}", &mut ok), "a NUL");
        assert!(!text_form_ok("[\"é\"]".as_bytes(), &mut |_| false), "the encoding check is asked");
        assert!(text_form_ok(b"[1]", &mut |_| false), "ASCII needs no encoding check");
        assert!(!text_form_ok(b"[1]\x7f\x80", &mut ok), "a byte above 0x7F is checked");
    }

    /// `[[[...null...]]]` `depth` levels deep, written in one pass (the model's writer
    /// recurses): level k's header at 8k, its one entry (a container, end offset stored) after
    /// it, the innermost `[null]` last.
    fn encode_deep(depth: usize) -> Vec<u8> {
        let h = Order::HOST;
        let total = 8 * depth;
        let mut b = Vec::with_capacity(total);
        for k in 0..depth {
            b.extend_from_slice(&h.put_u32(1 | JB_FARRAY));
            let entry = if k + 1 == depth { JENTRY_ISNULL | JENTRY_HAS_OFF } else { JENTRY_ISCONTAINER | JENTRY_HAS_OFF | (total - 8 * (k + 1)) as u32 };
            b.extend_from_slice(&h.put_u32(entry));
        }
        b
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let numeric = (any::<bool>(), -80i16..80, 0u16..80, proptest::collection::vec(1u16..10_000, 0..5)).prop_map(|(neg, w, ds, mut d)| {
            if let Some(l) = d.last_mut() {
                *l = (*l).max(1);
            }
            let mut n = Numeric { negative: neg, weight: if d.is_empty() { 0 } else { w }, dscale: ds, digits: d };
            n.dscale = n.dscale.max(n.min_dscale());
            Value::Num(n)
        });
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            "[a-zé✓ ]{0,12}".prop_map(|x| Value::Str(x.into_bytes())),
            numeric,
        ];
        leaf.prop_recursive(4, 200, 40, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..40).prop_map(Value::Array),
                proptest::collection::vec(("[a-c]{0,3}", inner), 0..40).prop_map(|p| Value::Object(p.into_iter().map(|(k, v)| (k.into_bytes(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn any_document_the_writer_makes_passes_in_either_byte_order(v in arb_value()) {
            let native = encode(&v, Order::HOST);
            prop_assert_eq!(check_native(&native, &mut ok), Ok(()));
            let v2 = decode(&native).expect("reads back");
            prop_assert_eq!(encode(&v2, Order::HOST), native.clone());
            for other in [Order::Little, Order::Big] {
                let mut b = encode(&v, other);
                prop_assert_eq!(check_foreign(&mut b, other, &mut ok), Ok(()));
                prop_assert_eq!(&b, &native);
            }
        }
    }
}
