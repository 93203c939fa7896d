//! Encrypted column types: `envelope.encrypted_text`, `encrypted_bytea`, `encrypted_jsonb`,
//! `encrypted_int8`, `encrypted_numeric`, `encrypted_date`, `encrypted_timestamptz`.
//!
//! Every type stores the same thing: an envelope (docs/envelope-format.md) in a plain varlena,
//! bound to its type by its context (a one-byte type code in format v3). Their I/O is the
//! envelope itself, so COPY, pg_dump and logical replication move ciphertext with no key:
//!
//! * text form: `pge1:` followed by the envelope in standard base64 (with padding);
//! * binary form (COPY BINARY, binary protocol): the raw envelope bytes.
//!
//! The input functions accept only a well-formed envelope. Plaintext never enters through them
//! (a literal would be converted at parse time, freezing whatever tenant was set then); it
//! enters through the VOLATILE assignment casts from each base type, evaluated at execution.
//! Errors never echo the rejected input: it may be plaintext somebody tried to store.
//!
//! Each value is bound to its type: the AAD context is `pg_envelope/type/<base type>`, so an
//! envelope moved between columns of different encrypted types fails to decrypt instead of
//! decoding into garbage. Plaintext encodings: text and bytea as raw bytes, jsonb as PostgreSQL's
//! internal form behind a marker of its byte order (checked completely before PostgreSQL reads
//! it: `pg_envelope_core::jsonb`; values written before the eleventh session hold the canonical
//! text output and decrypt through `jsonb_in`, forever), and int8, numeric, date and timestamptz
//! as their binary send format (independent of DateStyle, TimeZone and client_encoding).
//!
//! The functions here are plain V1 C functions declared by hand in `sql/encrypted_types.sql`:
//! one C symbol serves every type, reading the concrete type from its SQL signature.

use std::ffi::CStr;

use pg_envelope_core::Envelope;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgLogLevel, PgSqlErrorCode};

use crate::backend;
use crate::error::OrRaise;

/// Prefix of the text form. The digit is the text-form version, not the envelope version.
// The text form's parser and printer live in the core (fuzzed there).
use pg_envelope_core::envelope::{parse_text_form, text_form, TEXT_PREFIX};

/// Exports `$name` as a V1 C function (with its `pg_finfo_` record) that runs `$imp` guarded.
macro_rules! v1_function {
    ($finfo:ident, $name:ident, $imp:path) => {
        #[no_mangle]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pg_sys::Pg_finfo_record {
            const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
        #[no_mangle]
        #[doc(hidden)]
        #[pg_guard]
        pub unsafe extern "C-unwind" fn $name(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
            unsafe { $imp(fcinfo) }
        }
    };
}
pub(crate) use v1_function;

fn invalid_input(type_hint: String) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        "pg_envelope: input is not a pg_envelope ciphertext",
        "pg_envelope",
    )
    .set_detail(format!(
        "Encrypted columns accept only ciphertext in their text form ({TEXT_PREFIX}<base64>); the input is not shown because it may be plaintext."
    ))
    .set_hint(format!(
        "To encrypt, send a typed value: a parameter typed as the base type ($1::{type_hint}), a cast ('...'::{type_hint}), or envelope.encrypt_field()."
    ))
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// A palloc'd varlena (4-byte header) written in place and returned to PostgreSQL as is.
pub struct PallocVarlena(*mut pg_sys::varlena, usize);

impl backend::OutBuf for PallocVarlena {
    #[inline(always)]
    fn zeroed(len: usize) -> Self {
        unsafe {
            let ptr = crate::nothrow::palloc0(len + pg_sys::VARHDRSZ) as *mut pg_sys::varlena;
            pgrx::set_varsize_4b(ptr, (len + pg_sys::VARHDRSZ) as i32);
            PallocVarlena(ptr, len)
        }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(pgrx::vardata_4b(self.0) as *mut u8, self.1) }
    }
}

impl PallocVarlena {
    fn into_datum(self) -> pg_sys::Datum {
        pg_sys::Datum::from(self.0)
    }
}

/// A palloc'd varlena returned to SQL as `bytea` without another copy.
pub struct ByteaOut(pub PallocVarlena);
/// A palloc'd varlena returned to SQL as `text` (the caller checked it is valid text).
pub struct TextOut(pub PallocVarlena);
pgrx::impl_sql_translatable!(ByteaOut, "bytea");
pgrx::impl_sql_translatable!(TextBytes<'_>, "text");

/// A `text` argument as its bytes in the database encoding, unvalidated. pgrx's `&str` insists
/// on UTF-8, which a LATIN1 or SQL_ASCII database does not give; encryption needs only bytes.
pub struct TextBytes<'a>(pub &'a [u8]);

/// A `bytea` argument as its bytes, read like [`TextBytes`].
pub struct ByteaBytes<'a>(pub &'a [u8]);
pgrx::impl_sql_translatable!(ByteaBytes<'_>, "bytea");

/// A varlena argument's bytes, read by [`varlena_bytes`]: pgrx's `&[u8]` makes a guarded call
/// to `pg_detoast_datum_packed` for every value (~85 instructions of `sigsetjmp` and call on a
/// short `encrypt_field`).
struct InPlace<'a>(&'a [u8]);

impl<'a> pgrx::datum::FromDatum for InPlace<'a> {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        // (A zero datum not flagged NULL, which only C callers could pass, is NULL as in pgrx.)
        if is_null || datum.is_null() {
            return None;
        }
        // SAFETY: a non-null varlena argument of the call.
        Some(InPlace(unsafe { varlena_bytes(datum.cast_mut_ptr()) }))
    }
}

macro_rules! in_place_arg {
    ($t:ident) => {
        unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for $t<'fcx> {
            unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                $t(unsafe { arg.unbox_arg_using_from_datum::<InPlace<'fcx>>() }
                    .unwrap_or_else(|| panic!("argument {index} must not be null"))
                    .0)
            }

            unsafe fn unbox_nullable_arg(arg: pgrx::callconv::Arg<'_, 'fcx>) -> pgrx::nullable::Nullable<Self> {
                unsafe { arg.unbox_arg_using_from_datum::<InPlace<'fcx>>() }.map(|b| $t(b.0)).into()
            }
        }
    };
}
in_place_arg!(TextBytes);
in_place_arg!(ByteaBytes);
pgrx::impl_sql_translatable!(TextOut, "text");

unsafe impl pgrx::callconv::BoxRet for ByteaOut {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0.into_datum()) }
    }
}

unsafe impl pgrx::callconv::BoxRet for TextOut {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(self.0.into_datum()) }
    }
}

impl pgrx::datum::IntoDatum for ByteaOut {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0.into_datum())
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::BYTEAOID
    }
}

impl pgrx::datum::IntoDatum for TextOut {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0.into_datum())
    }
    fn type_oid() -> pg_sys::Oid {
        pg_sys::TEXTOID
    }
}

/// Copies `bytes` into a new palloc'd varlena and returns it as a Datum.
unsafe fn varlena_datum(bytes: &[u8]) -> pg_sys::Datum {
    let total = bytes.len() + pg_sys::VARHDRSZ;
    let ptr = pg_sys::palloc(total) as *mut pg_sys::varlena;
    pgrx::set_varsize_4b(ptr, total as i32);
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), pgrx::vardata_4b(ptr) as *mut u8, bytes.len());
    pg_sys::Datum::from(ptr)
}

/// The bytes of a (possibly toasted) varlena argument.
#[inline(always)]
pub(crate) unsafe fn arg_bytes<'a>(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> &'a [u8] {
    varlena_bytes(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n).cast_mut_ptr::<pg_sys::varlena>())
}

/// The bytes of a non-null varlena. Neither compressed nor external (a short or plain header:
/// every envelope read from a page, where they are stored uncompressed): read in place, as
/// `pg_detoast_datum_packed` itself would return it, without its guarded call (~150
/// instructions per value); otherwise through that call.
#[inline(always)]
unsafe fn varlena_bytes<'a>(raw: *mut pg_sys::varlena) -> &'a [u8] {
    if !pgrx::varatt_is_4b_c(raw) && !pgrx::varatt_is_1b_e(raw) {
        return pgrx::varlena_to_byte_slice(raw);
    }
    pgrx::varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(raw))
}


/// The SQL name of the type a function returns (for hints only).
unsafe fn declared_base_name(fcinfo: pg_sys::FunctionCallInfo) -> String {
    let ret = pg_sys::get_fn_expr_rettype((*fcinfo).flinfo);
    if ret == pg_sys::Oid::INVALID {
        return "text".into();
    }
    let name = pg_sys::format_type_be(ret);
    // envelope.encrypted_<base> -> <base>
    let full = CStr::from_ptr(name).to_string_lossy();
    full.rsplit('.').next().unwrap_or("text").trim_start_matches("encrypted_").to_string()
}

v1_function!(pg_finfo_pge_envelope_in, pge_envelope_in, envelope_in_impl);
unsafe fn envelope_in_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let cstr = CStr::from_ptr(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).cast_mut_ptr::<std::ffi::c_char>());
    match cstr.to_str().ok().and_then(parse_text_form) {
        Some(bytes) => varlena_datum(&bytes),
        None => invalid_input(declared_base_name(fcinfo)),
    }
}

v1_function!(pg_finfo_pge_envelope_out, pge_envelope_out, envelope_out_impl);
unsafe fn envelope_out_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let s = text_form(arg_bytes(fcinfo, 0));
    pg_sys::Datum::from(pgrx::pg_sys::pstrdup(std::ffi::CString::new(s).expect("base64 has no NUL").as_ptr()))
}

v1_function!(pg_finfo_pge_envelope_recv, pge_envelope_recv, envelope_recv_impl);
unsafe fn envelope_recv_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let buf = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).cast_mut_ptr::<pg_sys::StringInfoData>();
    let remaining = ((*buf).len - (*buf).cursor) as usize;
    let start = (*buf).data.add((*buf).cursor as usize) as *const u8;
    let bytes = std::slice::from_raw_parts(start, remaining);
    if Envelope::parse(bytes).is_err() {
        invalid_input(declared_base_name(fcinfo));
    }
    (*buf).cursor = (*buf).len;
    varlena_datum(bytes)
}

v1_function!(pg_finfo_pge_envelope_send, pge_envelope_send, envelope_send_impl);
unsafe fn envelope_send_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    varlena_datum(arg_bytes(fcinfo, 0))
}

/// How a base type's values become plaintext bytes and back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Codec {
    Raw,
    /// jsonb: the internal form (text form as the fallback and for older values).
    Jsonb,
    BinaryIo,
}

/// Per-call-site cache (in `fn_extra`): the base type, its codec and I/O function.
#[repr(C)]
struct TypeIo {
    base: pg_sys::Oid,
    codec: Codec,
    ioparam: pg_sys::Oid,
    tag: &'static [u8],
    io: pg_sys::FmgrInfo,
}

impl TypeIo {
    /// The type's context (`pg_envelope/type/<base>`), bound into every value's AAD: the core's
    /// static (`envelope::TYPE_CONTEXTS`), whose code the AAD takes from its address.
    fn tag(&self) -> &[u8] {
        self.tag
    }
}

/// Looks up (once per call site) the base type of an encrypt (`encrypt = true`: the argument) or
/// decrypt (the return type) function, and the I/O function its codec needs.
#[inline(always)]
unsafe fn type_io(fcinfo: pg_sys::FunctionCallInfo, encrypt: bool) -> &'static TypeIo {
    let flinfo = (*fcinfo).flinfo;
    if !(*flinfo).fn_extra.is_null() {
        return &*((*flinfo).fn_extra as *const TypeIo);
    }
    type_io_lookup(flinfo, encrypt)
}

/// [`type_io`]'s first call at a call site.
#[cold]
#[inline(never)]
unsafe fn type_io_lookup(flinfo: *mut pg_sys::FmgrInfo, encrypt: bool) -> &'static TypeIo {
    let mut argtypes: *mut pg_sys::Oid = std::ptr::null_mut();
    let mut nargs = 0;
    let ret = pg_sys::get_func_signature((*flinfo).fn_oid, &mut argtypes, &mut nargs);
    let base = if encrypt { *argtypes } else { ret };
    // The context's index in `TYPE_CONTEXTS` (its code minus one).
    let (codec, ctx) = match base {
        pg_sys::TEXTOID => (Codec::Raw, 0),
        pg_sys::BYTEAOID => (Codec::Raw, 1),
        pg_sys::JSONBOID => (Codec::Jsonb, 2),
        pg_sys::INT8OID => (Codec::BinaryIo, 3),
        pg_sys::NUMERICOID => (Codec::BinaryIo, 4),
        pg_sys::DATEOID => (Codec::BinaryIo, 5),
        pg_sys::TIMESTAMPTZOID => (Codec::BinaryIo, 6),
        other => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("pg_envelope: no encrypted type for base type oid {}", other.to_u32()),
                "pg_envelope",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        }
    };
    let cache = pg_sys::MemoryContextAllocZero((*flinfo).fn_mcxt, std::mem::size_of::<TypeIo>()) as *mut TypeIo;
    let c = &mut *cache;
    c.base = base;
    c.codec = codec;
    c.tag = pg_envelope_core::envelope::TYPE_CONTEXTS[ctx];
    let mut func = pg_sys::Oid::INVALID;
    let mut ioparam = pg_sys::Oid::INVALID;
    let mut is_varlena = false;
    match (codec, encrypt) {
        (Codec::Raw, _) => {}
        (Codec::Jsonb, true) => pg_sys::getTypeOutputInfo(base, &mut func, &mut is_varlena),
        // Decryption parses older text-form values with jsonb_in by its built-in OID, inside
        // `JsonbPlain::accept` (which has no call site's cache): nothing to look up.
        (Codec::Jsonb, false) => {}
        (Codec::BinaryIo, true) => pg_sys::getTypeBinaryOutputInfo(base, &mut func, &mut is_varlena),
        (Codec::BinaryIo, false) => pg_sys::getTypeBinaryInputInfo(base, &mut func, &mut ioparam),
    }
    c.ioparam = ioparam;
    if func != pg_sys::Oid::INVALID {
        pg_sys::fmgr_info_cxt(func, &mut c.io, (*flinfo).fn_mcxt);
    }
    (*flinfo).fn_extra = cache as *mut std::ffi::c_void;
    &*cache
}

// Base type -> encrypted type (the assignment casts and envelope.encrypt_<type>()).
v1_function!(pg_finfo_pge_encrypt_typed, pge_encrypt_typed, encrypt_typed_impl);
unsafe fn encrypt_typed_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let io = type_io(fcinfo, true);
    let value = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0);
    let envelope: PallocVarlena = match io.codec {
        Codec::Raw => backend::encrypt_to(arg_bytes(fcinfo, 0), Some(io.tag())),
        Codec::Jsonb => encrypt_jsonb(io, value),
        Codec::BinaryIo => {
            let b = pg_sys::SendFunctionCall(&io.io as *const _ as *mut _, value);
            let r = backend::encrypt_to(pgrx::varlena_to_byte_slice(b as *const _), Some(io.tag()));
            pg_sys::pfree(b as *mut _);
            r
        }
    }
    .or_raise();
    envelope.into_datum()
}

// Encrypted type -> base type (the explicit casts and envelope.decrypt_field(encrypted_<type>)).
v1_function!(pg_finfo_pge_decrypt_typed, pge_decrypt_typed, decrypt_typed_impl);
unsafe fn decrypt_typed_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let io = type_io(fcinfo, false);
    if io.codec == Codec::Raw {
        // text and bytea: decrypt straight into the result varlena.
        let out: PallocVarlena = backend::decrypt_to(arg_bytes(fcinfo, 0), Some(io.tag())).or_raise();
        return out.into_datum();
    }
    if io.codec == Codec::Jsonb {
        return decrypt_jsonb(fcinfo, io);
    }
    // Room for a trailing NUL (the text input function needs it), wiped on drop: no
    // reallocation leaves an unwiped copy of the plaintext behind.
    let mut plain: WipedCString = backend::decrypt_to(arg_bytes(fcinfo, 0), Some(io.tag())).or_raise();
    match io.codec {
        Codec::Raw | Codec::Jsonb => unreachable!("handled above"),
        Codec::BinaryIo => {
            // int8, date and timestamptz are fixed-size big-endian integers: decoded here, with
            // the receive functions' own range checks; anything else (a wrong length, a value
            // out of range) goes to the receive function, which raises PostgreSQL's error.
            // numeric first: decode_fixed's match would only say no to it.
            let decoded = if io.base == pg_sys::NUMERICOID {
                decode_numeric(backend::OutBuf::bytes_mut(&mut plain))
            } else {
                decode_fixed(io.base, backend::OutBuf::bytes_mut(&mut plain))
            };
            if let Some(d) = decoded {
                return d;
            }
            // The receive function reads the plaintext where it is: a StringInfo over the
            // buffer (NUL-terminated, as a StringInfo's data must be), no copy to wipe.
            let len = backend::OutBuf::bytes_mut(&mut plain).len();
            let mut si = pg_sys::StringInfoData { data: plain.as_c_ptr(), len: len as i32, maxlen: len as i32 + 1, cursor: 0 };
            pg_sys::ReceiveFunctionCall(&io.io as *const _ as *mut _, &mut si, io.ioparam, -1)
        }
    }
}

/// The server encoding's check of a jsonb string's bytes (NUL bytes are refused before it is
/// asked): Rust's UTF-8 validation in a UTF-8 database (the same set PostgreSQL's verifier
/// accepts: no overlong forms, surrogates or code points above U+10FFFF), PostgreSQL's own
/// verifier in any other.
fn jsonb_string_check() -> impl FnMut(&[u8]) -> bool {
    // Asked only for strings that are not plain ASCII: the encoding is looked up then.
    move |s: &[u8]| {
        let encoding = crate::nothrow::database_encoding();
        if encoding == pg_sys::pg_enc::PG_UTF8 as i32 {
            std::str::from_utf8(s).is_ok()
        } else {
            crate::nothrow::verify_mbstr(encoding, s)
        }
    }
}

/// jsonb -> envelope: the document's internal form behind its marker (`pg_envelope_core::jsonb`),
/// when the same check decryption runs accepts it; the canonical text form otherwise (a document
/// PostgreSQL's current writer would not produce byte for byte, such as one holding a numeric
/// from before PostgreSQL 9.1), which decrypts through `jsonb_in` as older values do.
unsafe fn encrypt_jsonb(io: &TypeIo, value: pg_sys::Datum) -> crate::error::Result<PallocVarlena> {
    use pg_envelope_core::jsonb;
    let raw = value.cast_mut_ptr::<pg_sys::varlena>();
    // A 4-byte header, uncompressed and in line: the form jsonb's own functions read.
    let full = pg_sys::pg_detoast_datum(raw);
    let body = pgrx::varlena_to_byte_slice(full);
    let r = if jsonb::check_native(body, &mut jsonb_string_check()).is_ok() {
        // Marker and document sealed straight from where they are: no joined copy to wipe.
        backend::encrypt_parts_to([&[jsonb::MARKER, jsonb::Order::HOST.form_byte()], body], Some(io.tag()))
    } else {
        let s = pg_sys::OutputFunctionCall(&io.io as *const _ as *mut _, value);
        let text = CStr::from_ptr(s).to_bytes();
        let r = backend::encrypt_to(text, Some(io.tag()));
        zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(s as *mut u8, text.len()));
        pg_sys::pfree(s as *mut _);
        r
    };
    if full != raw {
        // A copy made here (detoasted or decompressed): wiped before it is freed.
        zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(pgrx::vardata_4b(full) as *mut u8, body.len()));
        pg_sys::pfree(full.cast());
    }
    r
}

/// A decrypted `encrypted_jsonb` plaintext, laid out so that an internal-form payload is the
/// result datum as it stands: the allocation has 2 bytes before the plaintext (with the 2-byte
/// marker, the room for a varlena header) and a NUL after it (for `jsonb_in`, older values).
/// Checked in [`backend::OutBuf::accept`], before the decryption is audited; a text-form
/// plaintext is parsed there too (`parsed`), so that one that is not a document is refused and
/// audited as a failure like a malformed internal form.
struct JsonbPlain {
    ptr: *mut u8,
    len: usize,
    internal: bool,
    parsed: Option<pg_sys::Datum>,
}

impl JsonbPlain {
    /// A text-form plaintext (values written before the internal form existed) parsed by
    /// `jsonb_in`: the document, or `Malformed` for text that is not one (a payload only a key
    /// holder could have made: `jsonb_out` wrote every genuine one). `jsonb_in`'s own error
    /// would quote the offending token, which is plaintext, so data exceptions (class 22) and
    /// its size limits (54000) are caught here and become the opaque `MalformedJsonb`; anything
    /// else (the stack depth, out of memory, an encoding conversion) is handed back
    /// (`Refusal::Raised`) to be recorded in the audit trail with its SQLSTATE and then raised
    /// as it is (insider review 71: it unwound past the audit and left no record), after the
    /// plaintext is wiped. Caught
    /// without a subtransaction: `jsonb_in` holds no lock, buffer or other resource, only
    /// memory in the current context (`PgTryBuilder` restores the context and flushes the
    /// error state, as `search.rs` does for a conversion).
    unsafe fn parse_text(&mut self) -> std::result::Result<pg_sys::Datum, backend::Refusal> {
        use pgrx::pg_sys::panic::CaughtError;
        use pgrx::PgSqlErrorCode as E;
        let (ptr, len) = (self.ptr, self.len);
        pgrx::PgTryBuilder::new(|| {
            Ok(pg_sys::OidInputFunctionCall(pg_sys::Oid::from(pg_sys::F_JSONB_IN), ptr.add(2).cast(), pg_sys::JSONBOID, -1))
        })
        .catch_others(move |e| {
            // SQLSTATE classes are the code's low 12 bits (ERRCODE_TO_CATEGORY).
            let class = |c: E| (c as isize) & 0xFFF;
            let not_a_document = matches!(&e, CaughtError::PostgresError(r)
                if class(r.sql_error_code()) == class(E::ERRCODE_DATA_EXCEPTION)
                    || r.sql_error_code() == E::ERRCODE_PROGRAM_LIMIT_EXCEEDED);
            // SAFETY: the allocation of `len + 3` bytes made by `zeroed`.
            zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(ptr, len + 3));
            Err(if not_a_document { backend::Refusal::Malformed } else { backend::Refusal::Raised(e) })
        })
        .execute()
    }

    /// The whole allocation, wiped.
    fn wipe(&mut self) {
        // SAFETY: the allocation of `len + 3` bytes made by `zeroed`.
        zeroize::Zeroize::zeroize(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len + 3) });
    }
}

impl backend::OutBuf for JsonbPlain {
    #[inline(always)]
    fn zeroed(len: usize) -> Self {
        JsonbPlain { ptr: crate::nothrow::palloc0(len + 3).cast(), len, internal: false, parsed: None }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len + 3` bytes allocated; the plaintext is bytes 2 .. len + 2.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(2), self.len) }
    }
    /// The internal form checked completely (and put in this machine's byte order); the text
    /// form checked for NUL bytes and the server encoding, then parsed by `jsonb_in`.
    fn accept(&mut self) -> std::result::Result<(), backend::Refusal> {
        use pg_envelope_core::jsonb;
        let mut strings = jsonb_string_check();
        // SAFETY: as in `bytes_mut` (a borrow of the allocation, not of `self`).
        let plain = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(2), self.len) };
        let ok = match jsonb::form(plain) {
            Ok(jsonb::Form::Internal(order)) => {
                self.internal = true;
                jsonb::check_foreign(&mut plain[jsonb::PREFIX_LEN..], order, &mut strings).is_ok()
            }
            Ok(jsonb::Form::Text) if jsonb::text_form_ok(plain, &mut strings) => {
                // SAFETY: a NUL-terminated plaintext (`zeroed`).
                self.parsed = Some(unsafe { self.parse_text() }?);
                true
            }
            Ok(jsonb::Form::Text) | Err(jsonb::Invalid) => false,
        };
        if !ok {
            self.wipe();
            return Err(backend::Refusal::Malformed);
        }
        Ok(())
    }
    /// The plaintext and, for a text-form value, the document `jsonb_in` made of it (review
    /// 71: a value the audit refused to return kept its parsed copy).
    fn discard(&mut self) {
        self.wipe();
        if let Some(d) = self.parsed.take() {
            // SAFETY: `jsonb_in`'s result, a palloc'd varlena with a 4-byte header.
            unsafe { zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(d.cast_mut_ptr::<u8>(), pgrx::varsize_any(d.cast_mut_ptr()))) };
        }
    }
}

/// envelope -> jsonb: an internal-form plaintext (checked and put in this machine's byte order
/// by `accept`) becomes the result with no copy; a text-form one was parsed by `accept`, and its
/// plaintext is wiped and freed here.
unsafe fn decrypt_jsonb(fcinfo: pg_sys::FunctionCallInfo, io: &TypeIo) -> pg_sys::Datum {
    let mut plain: JsonbPlain = backend::decrypt_to(arg_bytes(fcinfo, 0), Some(io.tag())).or_raise();
    if plain.internal {
        pgrx::set_varsize_4b(plain.ptr.cast(), (plain.len + 2) as i32);
        return pg_sys::Datum::from(plain.ptr);
    }
    let parsed = plain.parsed.expect("an accepted text-form plaintext is parsed");
    plain.wipe();
    pg_sys::pfree(plain.ptr.cast());
    parsed
}

/// The binary form of an int8, date or timestamptz as a Datum, when it is well-formed and in
/// range (`int8recv`, `date_recv`, `timestamptz_recv` with typmod -1 accept exactly these).
fn decode_fixed(base: pg_sys::Oid, b: &[u8]) -> Option<pg_sys::Datum> {
    // datatype/timestamp.h: MIN_TIMESTAMP, END_TIMESTAMP; the Julian-day bounds of IS_VALID_DATE.
    const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
    const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;
    const MIN_DATE: i32 = -2_451_545; // DATETIME_MIN_JULIAN (0) - POSTGRES_EPOCH_JDATE
    const END_DATE: i32 = 2_147_483_494 - 2_451_545; // DATE_END_JULIAN - POSTGRES_EPOCH_JDATE
    match base {
        pg_sys::INT8OID => Some(pg_sys::Datum::from(i64::from_be_bytes(b.try_into().ok()?))),
        pg_sys::TIMESTAMPTZOID => {
            let t = i64::from_be_bytes(b.try_into().ok()?);
            // -infinity and infinity, or a finite value in range.
            (t == i64::MIN || t == i64::MAX || (MIN_TIMESTAMP..END_TIMESTAMP).contains(&t)).then(|| pg_sys::Datum::from(t))
        }
        pg_sys::DATEOID => {
            let d = i32::from_be_bytes(b.try_into().ok()?);
            (d == i32::MIN || d == i32::MAX || (MIN_DATE..END_DATE).contains(&d)).then(|| pg_sys::Datum::from(d))
        }
        _ => None,
    }
}

/// A numeric's binary send form as the Numeric datum `numeric_recv` (typmod -1) would return,
/// for the canonical finite values `numeric_send` writes (what an encrypted_numeric holds):
/// every digit below 10000, no leading or trailing zero digit, no digit beyond the display
/// scale, a weight the format can hold. Anything else (NaN, infinities, a value needing
/// truncation or normalisation, a malformed form) returns `None` and goes to `numeric_recv`
/// itself, which handles or refuses it with PostgreSQL's error. The datum is built as
/// `make_result` builds it (utils/adt/numeric.c, the same in PostgreSQL 15-18: the short
/// header when weight and scale fit in it, the long one otherwise); the regression test
/// compares value, scale and stored size with the original's. `numeric_recv` cost ~850
/// instructions per value here (a guarded call, a NumericVar allocated, filled, copied, freed).
fn decode_numeric(b: &[u8]) -> Option<pg_sys::Datum> {
    // The on-disk format and make_result's rules: shared with the jsonb check.
    use pg_envelope_core::numeric::{
        fraction_digits, short_fits, NBASE, NUMERIC_DSCALE_MASK, NUMERIC_NEG, NUMERIC_POS, NUMERIC_SHORT,
        NUMERIC_SHORT_DSCALE_SHIFT, NUMERIC_SHORT_SIGN_MASK, NUMERIC_SHORT_WEIGHT_MASK, NUMERIC_SHORT_WEIGHT_SIGN_MASK,
    };
    let (hdr, rest) = b.split_first_chunk::<8>()?;
    let (digits, tail) = rest.as_chunks::<2>();
    let n = u16::from_be_bytes([hdr[0], hdr[1]]) as usize;
    let weight = i16::from_be_bytes([hdr[2], hdr[3]]) as i32;
    let sign = u16::from_be_bytes([hdr[4], hdr[5]]);
    let dscale = u16::from_be_bytes([hdr[6], hdr[7]]);
    if digits.len() != n || !tail.is_empty() || !(sign == NUMERIC_POS || sign == NUMERIC_NEG) || dscale & NUMERIC_DSCALE_MASK != dscale {
        return None;
    }
    match (digits.first(), digits.last()) {
        (None, _) | (_, None) => {
            // Zero: make_result gives it weight 0 and a positive sign.
            if weight != 0 || sign != NUMERIC_POS {
                return None;
            }
        }
        (Some(first), Some(last)) => {
            // Already normalised (make_result would strip zero digits at either end) and
            // nothing beyond the display scale (trunc_var would cut it).
            let last = u16::from_be_bytes(*last);
            if u16::from_be_bytes(*first) == 0 || last == 0 || fraction_digits(weight, n, last) > dscale as i64 {
                return None;
            }
        }
    }
    let short = short_fits(dscale, weight);
    let head = if short { 2 } else { 4 };
    let size = pg_sys::VARHDRSZ + head + 2 * n;
    unsafe {
        // Not zeroed: every byte (header, head, digits) is written below, through raw pointers
        // (no slice over the uninitialised allocation).
        let p = crate::nothrow::palloc(size) as *mut u8;
        pgrx::set_varsize_4b(p.cast(), size as i32);
        let body = p.add(pg_sys::VARHDRSZ);
        let put = |off: usize, v: [u8; 2]| std::ptr::copy_nonoverlapping(v.as_ptr(), body.add(off), 2);
        if short {
            let h = NUMERIC_SHORT
                | if sign == NUMERIC_NEG { NUMERIC_SHORT_SIGN_MASK } else { 0 }
                | (dscale << NUMERIC_SHORT_DSCALE_SHIFT)
                | if weight < 0 { NUMERIC_SHORT_WEIGHT_SIGN_MASK } else { 0 }
                | (weight as u16 & NUMERIC_SHORT_WEIGHT_MASK);
            put(0, h.to_ne_bytes());
        } else {
            put(0, (sign | (dscale & NUMERIC_DSCALE_MASK)).to_ne_bytes());
            put(2, (weight as i16).to_ne_bytes());
        }
        // Every digit checked as it is copied (one pass).
        for (i, d) in digits.iter().enumerate() {
            let d = u16::from_be_bytes(*d);
            if d >= NBASE {
                pg_sys::pfree(p.cast());
                return None;
            }
            put(head + 2 * i, (d as i16).to_ne_bytes());
        }
        Some(pg_sys::Datum::from(p))
    }
}

/// Plaintexts up to this size (with the trailing NUL) are decoded from a buffer kept for the
/// backend, longer ones from their own allocation.
const SCRATCH: usize = 256;

/// The backend's buffer for short typed plaintexts (int8, date, timestamptz and most numerics;
/// jsonb decrypts into its own result, `JsonbPlain`): no allocation per value. All zeros
/// whenever it is not in use (wiped after every value). A process static, not a thread-local:
/// a backend runs SQL functions on one thread (pgrx refuses others), and a thread-local in a `dlopen`ed library costs a `__tls_get_addr`
/// call per access (two per value, with the `RefCell` and `Option` around the buffer).
struct Scratch {
    buf: std::cell::UnsafeCell<[u8; SCRATCH]>,
    busy: std::cell::Cell<bool>,
}
// SAFETY: used only on the backend's one thread (the typed decryption functions); `busy` keeps
// a nested use (none is known) off the buffer: it gets its own allocation.
unsafe impl Sync for Scratch {}
static SCRATCH_BUF: Scratch = Scratch { buf: std::cell::UnsafeCell::new([0; SCRATCH]), busy: std::cell::Cell::new(false) };

/// A decrypted plaintext followed by a NUL byte, wiped on drop: in the backend's scratch buffer
/// when it fits, otherwise in its own allocation.
enum WipedCString {
    /// The plaintext's length in `SCRATCH_BUF`, which this value holds (`busy`) until dropped.
    Scratch(usize),
    Heap(Vec<u8>),
}

impl backend::OutBuf for WipedCString {
    fn zeroed(len: usize) -> Self {
        if len < SCRATCH && !SCRATCH_BUF.busy.replace(true) {
            return WipedCString::Scratch(len);
        }
        WipedCString::Heap(vec![0u8; len + 1])
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: this value holds the buffer (`busy`), and the borrow is tied to `self`.
            WipedCString::Scratch(len) => unsafe { &mut (&mut *SCRATCH_BUF.buf.get())[..*len] },
            WipedCString::Heap(v) => {
                let n = v.len() - 1;
                &mut v[..n]
            }
        }
    }
}

impl WipedCString {
    fn as_c_ptr(&mut self) -> *mut std::ffi::c_char {
        match self {
            WipedCString::Scratch(_) => SCRATCH_BUF.buf.get().cast(),
            WipedCString::Heap(v) => v.as_mut_ptr().cast(),
        }
    }
}

impl Drop for WipedCString {
    fn drop(&mut self) {
        match self {
            WipedCString::Scratch(len) => {
                // SAFETY: as in `bytes_mut`; the plaintext and its NUL are wiped before the buffer
                // is handed back.
                zeroize::Zeroize::zeroize(unsafe { &mut (&mut *SCRATCH_BUF.buf.get())[..=*len] });
                SCRATCH_BUF.busy.set(false);
            }
            WipedCString::Heap(v) => zeroize::Zeroize::zeroize(v),
        }
    }
}

// Encrypted type -> the same type re-encrypted under the tenant's active data key
// (envelope.reencrypt_value(encrypted_<type>), key administrators). The plaintext bytes are
// re-encrypted as they are, under the same type context: no decoding, no type change.
v1_function!(pg_finfo_pge_reencrypt_typed, pge_reencrypt_typed, reencrypt_typed_impl);
unsafe fn reencrypt_typed_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    crate::reencrypt::check_in_batch(pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 1).unwrap_or(0));
    let tag = typed_tag(fcinfo);
    let out: PallocVarlena = backend::reencrypt_to(arg_bytes(fcinfo, 0), Some(tag)).or_raise();
    out.into_datum()
}

/// The type context of a function's first argument (an encrypted type, or a domain over one):
/// `pg_envelope/type/<base>`, cached per call site.
unsafe fn typed_tag(fcinfo: pg_sys::FunctionCallInfo) -> &'static [u8] {
    let flinfo = (*fcinfo).flinfo;
    if (*flinfo).fn_extra.is_null() {
        let mut argtypes: *mut pg_sys::Oid = std::ptr::null_mut();
        let mut nargs = 0;
        pg_sys::get_func_signature((*flinfo).fn_oid, &mut argtypes, &mut nargs);
        let base = pg_sys::getBaseType(*argtypes);
        let name = CStr::from_ptr(pg_sys::format_type_be(base)).to_string_lossy().into_owned();
        let short = name.rsplit('.').next().unwrap_or("").trim_matches('"');
        // The core's static context (its code is then read from its address: `type_code`).
        let tag = short.strip_prefix("encrypted_").and_then(|b| {
            let tag = format!("pg_envelope/type/{b}");
            pg_envelope_core::envelope::TYPE_CONTEXTS.iter().find(|c| **c == tag.as_bytes())
        });
        let Some(tag) = tag else {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!("pg_envelope: {name} is not an encrypted type"),
                "pg_envelope",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        };
        let t = pg_sys::MemoryContextAlloc((*flinfo).fn_mcxt, std::mem::size_of::<&'static [u8]>()) as *mut &'static [u8];
        t.write(*tag);
        (*flinfo).fn_extra = t.cast();
    }
    *((*flinfo).fn_extra as *const &'static [u8])
}
