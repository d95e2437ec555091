//! One way to read and write the integers of on-disk structures.
//!
//! A structure of fixed length is described once, as a [`FixedBlock`]: its
//! name, its length and one [`Field`] constant per field (name, offset,
//! width). [`tiles`] checks at compile time that the fields cover the block
//! exactly, so a field added, resized or moved without updating the others
//! fails to build. Messages take offsets from these definitions, never from
//! repeated literals.
//!
//! [`FieldReader`] reads a byte slice whose first byte sits at an absolute
//! offset of the file (`base`), sequentially or by [`Field`], with the
//! endianness in the method's name (`u32_le`, `u64_be`, ...). Running out
//! of bytes is a [`FieldError`] that names the structure and the ABSOLUTE
//! offset of the field (base + field offset), as the format specification's
//! "Offsets" section asks. [`FieldWriter`] builds a block the same way.

use std::fmt;

/// One field of a fixed block: its name, offset in the block and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// The name the specification gives it.
    pub name: &'static str,
    /// Offset from the start of the block.
    pub at: usize,
    /// Width in bytes.
    pub len: usize,
}

impl Field {
    /// The first field of a block.
    pub const fn first(name: &'static str, len: usize) -> Field {
        Field { name, at: 0, len }
    }

    /// The field right after `self`.
    pub const fn then(self, name: &'static str, len: usize) -> Field {
        Field {
            name,
            at: self.at + self.len,
            len,
        }
    }

    /// Offset of the first byte after the field.
    pub const fn end(self) -> usize {
        self.at + self.len
    }

    /// Element `i` of an array field whose elements are `len` bytes wide
    /// (a reader still checks that it lies inside the bytes there are).
    pub const fn element(self, i: usize, len: usize) -> Field {
        Field {
            name: self.name,
            at: self.at + i * len,
            len,
        }
    }

    /// The byte range of the field in its block.
    pub const fn range(self) -> std::ops::Range<usize> {
        self.at..self.at + self.len
    }
}

/// A structure of fixed length on disk.
pub trait FixedBlock {
    /// Its name in messages ("footer", "extent header", ...).
    const NAME: &'static str;
    /// Its length in bytes.
    const LEN: usize;
    /// Its fields, in order, covering the block exactly (checked by
    /// [`tiles`] in a `const` assertion next to each definition).
    const FIELDS: &'static [Field];
}

/// Describe a fixed block once: `fixed_block!(Type = "name", LEN; FIELD("field name", width), ...)`
/// gives `Type` one associated [`Field`] constant per field (each placed
/// right after the one before), implements [`FixedBlock`] and asserts at
/// compile time that the fields cover exactly `LEN` bytes.
macro_rules! fixed_block {
    ($ty:ty = $name:literal, $len:expr; $f0:ident($n0:literal, $l0:expr) $(, $f:ident($n:literal, $l:expr))* $(,)?) => {
        impl $ty {
            #[doc = concat!("Field `", $n0, "`.")]
            pub const $f0: $crate::format::field::Field = $crate::format::field::Field::first($n0, $l0);
            $crate::format::field::fixed_block!(@rest $f0 $(, $f($n, $l))*);
        }
        impl $crate::format::field::FixedBlock for $ty {
            const NAME: &'static str = $name;
            const LEN: usize = $len;
            const FIELDS: &'static [$crate::format::field::Field] = &[<$ty>::$f0 $(, <$ty>::$f)*];
        }
        const _: () = assert!($crate::format::field::tiles(
            <$ty as $crate::format::field::FixedBlock>::FIELDS,
            $len
        ));
    };
    (@rest $prev:ident, $f:ident($n:literal, $l:expr) $(, $g:ident($m:literal, $k:expr))*) => {
        #[doc = concat!("Field `", $n, "`.")]
        pub const $f: $crate::format::field::Field = Self::$prev.then($n, $l);
        $crate::format::field::fixed_block!(@rest $f $(, $g($m, $k))*);
    };
    (@rest $prev:ident) => {};
}
pub(crate) use fixed_block;

/// True when `fields` follow each other without gap or overlap from offset
/// 0 to `len`: the compile-time check of a block's layout.
pub const fn tiles(fields: &[Field], len: usize) -> bool {
    let mut at = 0;
    let mut i = 0;
    while i < fields.len() {
        if fields[i].at != at || fields[i].len == 0 {
            return false;
        }
        at += fields[i].len;
        i += 1;
    }
    at == len
}

/// A field did not fit in the bytes there are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// The structure being read.
    pub structure: &'static str,
    /// The field, when it has a name.
    pub field: Option<&'static str>,
    /// Absolute offset of the field in the file.
    pub offset: u64,
    /// Bytes the field needs.
    pub need: usize,
    /// Bytes left in the structure at that offset.
    pub have: usize,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.structure)?;
        if let Some(field) = self.field {
            write!(f, " field {field}")?;
        }
        write!(
            f,
            " at offset {} needs {} bytes but only {} remain in it",
            self.offset, self.need, self.have
        )
    }
}

impl From<FieldError> for crate::Error {
    fn from(e: FieldError) -> Self {
        crate::Error::corrupt(e.offset, e.to_string())
    }
}

/// Calls `$m!` with the one table of integer fields: method names,
/// type, and its decoding and encoding functions.
macro_rules! with_int_fields {
    ($m:ident) => {
        $m! {
            u16_le, u16_le_at: u16, from_le_bytes, to_le_bytes;
            u16_be, u16_be_at: u16, from_be_bytes, to_be_bytes;
            u32_le, u32_le_at: u32, from_le_bytes, to_le_bytes;
            u32_be, u32_be_at: u32, from_be_bytes, to_be_bytes;
            u64_le, u64_le_at: u64, from_le_bytes, to_le_bytes;
            u64_be, u64_be_at: u64, from_be_bytes, to_be_bytes;
            i64_le, i64_le_at: i64, from_le_bytes, to_le_bytes;
        }
    };
}

macro_rules! read_ints {
    ($($name:ident, $at:ident: $t:ty, $from:ident, $to:ident;)*) => {$(
        #[doc = concat!("The next `", stringify!($t), "`, ", stringify!($from), ".")]
        pub fn $name(&mut self) -> Result<$t, FieldError> {
            Ok(<$t>::$from(self.bytes::<{ std::mem::size_of::<$t>() }>()?))
        }
        #[doc = concat!("The `", stringify!($t), "` of `field` (", stringify!($from), "), wherever the cursor is.")]
        pub fn $at(&self, field: Field) -> Result<$t, FieldError> {
            Ok(<$t>::$from(self.field_bytes::<{ std::mem::size_of::<$t>() }>(field)?))
        }
    )*};
}

/// Bounds-checked reader over the bytes of one structure whose first byte
/// sits at absolute offset `base` of the file.
#[derive(Clone, Debug)]
pub struct FieldReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: u64,
    structure: &'static str,
}

impl<'a> FieldReader<'a> {
    /// A reader at the start of `bytes`, which begin at absolute `base`.
    pub fn new(bytes: &'a [u8], base: u64, structure: &'static str) -> Self {
        FieldReader {
            bytes,
            pos: 0,
            base,
            structure,
        }
    }

    /// A reader over a fixed block `B`.
    pub fn block<B: FixedBlock>(bytes: &'a [u8], base: u64) -> Self {
        Self::new(bytes, base, B::NAME)
    }

    /// Absolute offset of the structure's first byte.
    pub fn start(&self) -> u64 {
        self.base
    }

    /// Absolute offset of the next byte.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Absolute offset of `field` of this structure.
    pub fn offset_of(&self, field: Field) -> u64 {
        self.base + field.at as u64
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn short(&self, field: Option<&'static str>, at: usize, need: usize) -> FieldError {
        FieldError {
            structure: self.structure,
            field,
            offset: self.base.saturating_add(at as u64),
            need,
            have: self.bytes.len().saturating_sub(at),
        }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FieldError> {
        if self.remaining() < n {
            return Err(self.short(None, self.pos, n));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<(), FieldError> {
        self.take(n).map(|_| ())
    }

    /// The next `N` bytes as an array.
    pub fn bytes<const N: usize>(&mut self) -> Result<[u8; N], FieldError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// The bytes of `field`.
    pub fn field(&self, field: Field) -> Result<&'a [u8], FieldError> {
        field
            .at
            .checked_add(field.len)
            .and_then(|end| self.bytes.get(field.at..end))
            .ok_or_else(|| self.short(Some(field.name), field.at, field.len))
    }

    /// The bytes of `field` as an array of its width (`N` must equal it).
    pub fn field_bytes<const N: usize>(&self, field: Field) -> Result<[u8; N], FieldError> {
        debug_assert_eq!(field.len, N, "field {} read as {N} bytes", field.name);
        let mut a = [0u8; N];
        a.copy_from_slice(self.field(Field { len: N, ..field })?);
        Ok(a)
    }

    /// The next `n` bytes as UTF-8 text; `field` names them in the error.
    pub fn utf8(&mut self, n: usize, field: &str) -> crate::Result<String> {
        let at = self.offset();
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| crate::Error::corrupt(at, format!("{field} is not valid UTF-8")))
    }

    /// The next byte.
    pub fn u8(&mut self) -> Result<u8, FieldError> {
        Ok(self.take(1)?[0])
    }

    /// The byte of `field`.
    pub fn u8_at(&self, field: Field) -> Result<u8, FieldError> {
        Ok(self.field_bytes::<1>(field)?[0])
    }

    with_int_fields!(read_ints);
}

macro_rules! write_ints {
    ($($name:ident, $at:ident: $t:ty, $from:ident, $to:ident;)*) => {$(
        #[doc = concat!("Append a `", stringify!($t), "`, ", stringify!($to), ".")]
        pub fn $name(&mut self, v: $t) -> &mut Self {
            self.out.extend_from_slice(&v.$to());
            self
        }
        #[doc = concat!("Write `field` (", stringify!($to), ") of the block that starts at `start` of the buffer.")]
        pub fn $at(&mut self, field: Field, v: $t) -> &mut Self {
            self.put(field, &v.$to())
        }
    )*};
}

/// Builds structures in a byte vector, appending or by [`Field`].
#[derive(Debug)]
pub struct FieldWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> FieldWriter<'a> {
    /// A writer appending to `out`; fields are placed relative to where the
    /// block starts (the current end of `out`).
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        let start = out.len();
        FieldWriter { out, start }
    }

    /// A writer for a block that starts at `start` of `out` (for blocks
    /// already laid out and now filled in by field).
    pub fn block_at(out: &'a mut Vec<u8>, start: usize) -> Self {
        FieldWriter { out, start }
    }

    /// Bytes written since the block started.
    pub fn len(&self) -> usize {
        self.out.len() - self.start
    }

    /// True when nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }

    /// Append `n` zero bytes.
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.out.resize(self.out.len() + n, 0);
        self
    }

    /// Append a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }

    /// Write `b` as `field`, growing the block with zeros up to it when
    /// needed. `b` must be as wide as the field.
    pub fn put(&mut self, field: Field, b: &[u8]) -> &mut Self {
        debug_assert_eq!(field.len, b.len(), "field {} written", field.name);
        let end = self.start + field.at + b.len();
        if self.out.len() < end {
            self.out.resize(end, 0);
        }
        self.out[self.start + field.at..end].copy_from_slice(b);
        self
    }

    with_int_fields!(write_ints);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Demo;
    fixed_block!(Demo = "demo block", 16; MAGIC("magic", 4), COUNT("count", 4), SIZE("size", 8));
    const MAGIC: Field = Demo::MAGIC;
    const COUNT: Field = Demo::COUNT;
    const SIZE: Field = Demo::SIZE;

    #[test]
    fn layouts_with_gaps_or_overlaps_do_not_tile() {
        assert!(tiles(Demo::FIELDS, 16));
        assert!(!tiles(Demo::FIELDS, 17));
        assert!(!tiles(&[MAGIC, SIZE], 16));
        assert!(!tiles(&[MAGIC, Field { at: 2, ..COUNT }], 6));
    }

    #[test]
    fn a_short_field_names_structure_and_absolute_offset() {
        let bytes = [0u8; 10];
        let r = FieldReader::block::<Demo>(&bytes, 4096);
        let e = r.u64_le_at(SIZE).unwrap_err();
        assert_eq!(
            e,
            FieldError {
                structure: "demo block",
                field: Some("size"),
                offset: 4096 + 8,
                need: 8,
                have: 2,
            }
        );
        assert_eq!(
            e.to_string(),
            "demo block field size at offset 4104 needs 8 bytes but only 2 remain in it"
        );
        let core: crate::Error = e.into();
        assert!(
            matches!(core, crate::Error::Corrupt { offset: 4104, .. }),
            "{core}"
        );

        let mut r = FieldReader::new(&bytes, 100, "stand-in list");
        r.skip(8).unwrap();
        let e = r.u32_be().unwrap_err();
        assert_eq!(
            (e.structure, e.offset, e.need, e.have),
            ("stand-in list", 108, 4, 2)
        );
        // A failed read consumes nothing.
        assert_eq!(r.u16_le().unwrap(), 0);
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn fields_far_beyond_the_slice_do_not_overflow() {
        let r = FieldReader::new(&[], u64::MAX - 100, "x");
        let far = Field {
            name: "far",
            at: usize::MAX - 2,
            len: 8,
        };
        assert!(r.field(far).is_err());
    }

    proptest! {
        #[test]
        fn round_trip_both_endiannesses(a in any::<u16>(), b in any::<u32>(), c in any::<u64>(), d in any::<i64>(), base in any::<u32>()) {
            let mut out = vec![0xAA];
            let mut w = FieldWriter::new(&mut out);
            w.u16_le(a).u16_be(a).u32_le(b).u32_be(b).u64_le(c).u64_be(c).i64_le(d).u8(7);
            prop_assert_eq!(w.len(), 2 + 2 + 4 + 4 + 8 + 8 + 8 + 1);
            let mut r = FieldReader::new(&out[1..], base as u64, "t");
            prop_assert_eq!(r.u16_le().unwrap(), a);
            prop_assert_eq!(r.u16_be().unwrap(), a);
            prop_assert_eq!(r.u32_le().unwrap(), b);
            prop_assert_eq!(r.u32_be().unwrap(), b);
            prop_assert_eq!(r.u64_le().unwrap(), c);
            prop_assert_eq!(r.u64_be().unwrap(), c);
            prop_assert_eq!(r.i64_le().unwrap(), d);
            prop_assert_eq!(r.u8().unwrap(), 7);
            prop_assert_eq!(r.offset(), base as u64 + 37);

            let mut out = Vec::new();
            FieldWriter::new(&mut out).u64_be_at(SIZE, c).u32_le_at(COUNT, b).bytes(&[]).put(MAGIC, b"DEMO");
            prop_assert_eq!(out.len(), Demo::LEN);
            let r = FieldReader::block::<Demo>(&out, base as u64);
            prop_assert_eq!(r.field(MAGIC).unwrap(), b"DEMO");
            prop_assert_eq!(r.u32_le_at(COUNT).unwrap(), b);
            prop_assert_eq!(r.u64_be_at(SIZE).unwrap(), c);
            prop_assert_eq!(r.offset_of(SIZE), base as u64 + 8);
        }
    }
}
