//! Every malformed-input case: built by the writer, corrupted byte-wise,
//! each asserting its own error variant and that the message names it.

mod common;
use common::*;
use gguf::{GgufError, GgufFile, Section};

#[test]
fn base_file_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_tmp(dir.path(), "ok.gguf", &base_bytes());
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.tensors().len(), 2);
    assert_eq!(f.metadata().len(), 5);
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.gguf");
    let e = GgufFile::open(&p).unwrap_err();
    assert!(matches!(e, GgufError::NotFound { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("nope.gguf") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn directory() {
    let dir = tempfile::tempdir().unwrap();
    let e = GgufFile::open(dir.path()).unwrap_err();
    assert!(matches!(e, GgufError::IsDirectory { .. }), "{e:?}");
    assert!(e.to_string().contains("is a directory"), "{e}");
}

#[test]
fn bad_magic() {
    let mut b = base_bytes();
    b[0..4].copy_from_slice(b"GGML");
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::BadMagic { found, .. } if &found == b"GGML"),
        "{e:?}"
    );
    assert!(e.to_string().contains("bad magic"), "{e}");
}

#[test]
fn empty_file_is_truncated_header() {
    let e = open_err(&[]);
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                section: Section::Header,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("truncated in header"), "{e}");
}

#[test]
fn version_1_unsupported() {
    let mut b = base_bytes();
    put_u32(&mut b, 4, 1);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::UnsupportedVersion { version: 1, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("unsupported GGUF version 1"), "{e}");
}

#[test]
fn version_4_and_big_endian_unsupported() {
    for v in [0u32, 4, 3u32.swap_bytes()] {
        let mut b = base_bytes();
        put_u32(&mut b, 4, v);
        let e = open_err(&b);
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("version {v}")), "{e}");
    }
}

#[test]
fn version_2_is_accepted() {
    let mut b = base_bytes();
    put_u32(&mut b, 4, 2);
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(write_tmp(dir.path(), "v2.gguf", &b)).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.tensors().len(), 2);
}

#[test]
fn truncated_header() {
    let b = base_bytes();
    for cut in [2, 4, 6, 8, 12, 16, 20, 23] {
        let e = open_err(&b[..cut]);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    section: Section::Header,
                    ..
                }
            ),
            "cut {cut}: {e:?}"
        );
        assert!(e.to_string().contains("truncated in header"), "{e}");
    }
}

#[test]
fn truncated_metadata_value_type() {
    let b = base_bytes();
    let at = after_str(&b, "test.kaa") + 2; // inside the u32 value type
    let e = open_err(&b[..at]);
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                section: Section::Metadata,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("truncated in metadata") && msg.contains("test.kaa"),
        "{msg}"
    );
}

#[test]
fn truncated_metadata_at_every_byte() {
    let b = base_bytes();
    let end = after_str(&b, "hello world");
    for cut in 24..end {
        let e = open_err(&b[..cut]);
        let ok = matches!(
            e,
            GgufError::Truncated {
                section: Section::Metadata,
                ..
            }
        ) || matches!(e, GgufError::StringTooLong { .. })
            || matches!(e, GgufError::ArrayTooLong { .. });
        assert!(ok, "cut {cut}: {e:?}");
    }
}

#[test]
fn truncated_tensor_infos_at_every_byte() {
    let b = base_bytes();
    let start = after_str(&b, "hello world");
    let (_, _, _, off) = tensor_fields(&b, "alphb");
    for cut in start..off + 8 {
        let e = open_err(&b[..cut]);
        let ok = matches!(
            e,
            GgufError::Truncated {
                section: Section::TensorInfo,
                ..
            }
        ) || matches!(e, GgufError::StringTooLong { .. });
        assert!(ok, "cut {cut}: {e:?}");
    }
    let (n_dims_at, ..) = tensor_fields(&b, "alpha");
    let e = open_err(&b[..n_dims_at + 1]);
    assert!(
        matches!(
            e,
            GgufError::Truncated {
                section: Section::TensorInfo,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("truncated in tensor infos") && msg.contains("alpha"),
        "{msg}"
    );
}

#[test]
fn truncated_data() {
    let b = base_bytes();
    let (_, _, _, off) = tensor_fields(&b, "alphb");
    let data_start = (off + 8).next_multiple_of(32);
    // Cut right after the tensor infos, in the padding, and inside each tensor.
    // alpha: 64 bytes at 0; alphb: 2 Q8_0 blocks = 68 bytes at 64 (the padding
    // after the last tensor is not needed).
    for cut in [
        off + 8,
        data_start,
        data_start + 10,
        data_start + 64 + 5,
        data_start + 64 + 67,
    ] {
        let e = open_err(&b[..cut]);
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    section: Section::Data,
                    ..
                }
            ),
            "cut {cut}: {e:?}"
        );
        assert!(e.to_string().contains("truncated in tensor data"), "{e}");
    }
}

#[test]
fn string_length_beyond_file() {
    let mut b = base_bytes();
    let at = find(&b, &{
        let mut n = 11u64.to_le_bytes().to_vec();
        n.extend_from_slice(b"hello world");
        n
    });
    put_u64(&mut b, at, 1 << 40);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::StringTooLong { len, .. } if len == 1 << 40),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("test.string") && msg.contains("beyond the end of the file"),
        "{msg}"
    );
}

#[test]
fn key_length_beyond_file() {
    let mut b = base_bytes();
    let at = after_str(&b, "test.kaa") - 8 - 8;
    put_u64(&mut b, at, u64::MAX);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::StringTooLong { len: u64::MAX, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("key of metadata entry 1"), "{e}");
}

#[test]
fn array_length_beyond_file() {
    let mut b = base_bytes();
    // value type ARRAY(9), element type u32(4), count
    let at = after_str(&b, "test.array") + 8;
    assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), 3);
    put_u64(&mut b, at, 1 << 60);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::ArrayTooLong { count, ref key, .. } if count == 1 << 60 && key == "test.array"),
        "{e:?}"
    );
    assert!(e.to_string().contains("array length"), "{e}");
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b
}

#[test]
fn huge_kv_count_does_not_allocate() {
    // No file could hold it: refused at once, naming the count.
    let e = open_err(&header(0, u64::MAX));
    assert!(matches!(e, GgufError::CountTooLarge { what: "metadata", .. }), "{e:?}");
    assert!(e.to_string().contains("metadata count 18446744073709551615 cannot be right"), "{e}");
    // A count a file could hold but this one does not: it runs out of bytes.
    let e = open_err(&header(0, 1 << 30));
    assert!(matches!(e, GgufError::Truncated { section: Section::Metadata, .. }), "{e:?}");
    // In a real file the parse runs into the tensor infos and fails there.
    let mut b = base_bytes();
    put_u64(&mut b, 16, 1 << 30);
    open_err(&b);
}

#[test]
fn huge_tensor_count_does_not_allocate() {
    let e = open_err(&header(u64::MAX, 0));
    assert!(matches!(e, GgufError::CountTooLarge { what: "tensor", .. }), "{e:?}");
    let e = open_err(&header(1 << 30, 0));
    assert!(matches!(e, GgufError::Truncated { section: Section::TensorInfo, .. }), "{e:?}");
    let mut b = base_bytes();
    put_u64(&mut b, 8, 1 << 30);
    open_err(&b);
}

#[test]
fn invalid_value_type() {
    let mut b = base_bytes();
    let at = after_str(&b, "test.kaa");
    put_u32(&mut b, at, 13);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::InvalidValueType { type_id: 13, ref key, .. } if key == "test.kaa"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("invalid metadata value type 13"),
        "{e}"
    );
}

#[test]
fn invalid_array_element_type() {
    let mut b = base_bytes();
    let at = after_str(&b, "test.array") + 4;
    put_u32(&mut b, at, 99);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::InvalidValueType { type_id: 99, .. }),
        "{e:?}"
    );
}

#[test]
fn invalid_utf8_key() {
    let mut b = base_bytes();
    let at = after_str(&b, "test.kaa") - 1;
    b[at] = 0xFF;
    let e = open_err(&b);
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e:?}");
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");
}

#[test]
fn duplicate_keys() {
    let mut b = base_bytes();
    let at = after_str(&b, "test.kab") - 1;
    b[at] = b'a';
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "test.kaa"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("duplicate metadata key 'test.kaa'"),
        "{e}"
    );
}

#[test]
fn empty_key() {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // key ""
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    let e = open_err(&b);
    assert!(matches!(e, GgufError::EmptyKey { index: 0, .. }), "{e:?}");
}

#[test]
fn arrays_nested_too_deep() {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(b"deep");
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..10_000 {
        b.extend_from_slice(&9u32.to_le_bytes()); // element type: array
        b.extend_from_slice(&1u64.to_le_bytes()); // one element
    }
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::NestingTooDeep { ref key, .. } if key == "deep"),
        "{e:?}"
    );
}

#[test]
fn alignment_not_power_of_two() {
    let mut w = gguf::GgufWriter::new();
    w.add("general.alignment", gguf::MetadataValue::U32(64));
    let mut b = w.to_bytes().unwrap();
    let at = after_str(&b, "general.alignment") + 4;
    put_u32(&mut b, at, 48);
    let e = open_err(&b);
    assert!(matches!(e, GgufError::BadAlignment { .. }), "{e:?}");
    assert!(e.to_string().contains("48 is not a power of two"), "{e}");
}

#[test]
fn alignment_wrong_type() {
    let mut w = gguf::GgufWriter::new();
    w.add("general.alignment", gguf::MetadataValue::U32(64));
    let mut b = w.to_bytes().unwrap();
    let at = after_str(&b, "general.alignment");
    put_u32(&mut b, at, 5); // u32 -> i32
    let e = open_err(&b);
    assert!(matches!(e, GgufError::BadAlignment { .. }), "{e:?}");
    assert!(
        e.to_string().contains("must be of type u32, found i32"),
        "{e}"
    );
}

#[test]
fn duplicate_tensor_names() {
    let mut b = base_bytes();
    let at = after_str(&b, "alphb") - 1;
    b[at] = b'a';
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::DuplicateTensor { ref name, .. } if name == "alpha"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("duplicate tensor name 'alpha'"),
        "{e}"
    );
}

#[test]
fn too_many_dims() {
    let mut b = base_bytes();
    let (n_dims_at, ..) = tensor_fields(&b, "alpha");
    put_u32(&mut b, n_dims_at, 5);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::TooManyDims { n_dims: 5, ref tensor, .. } if tensor == "alpha"),
        "{e:?}"
    );
    assert!(e.to_string().contains("'alpha' has 5 dimensions"), "{e}");
}

#[test]
fn no_dims() {
    let mut b = base_bytes();
    let (n_dims_at, ..) = tensor_fields(&b, "alpha");
    put_u32(&mut b, n_dims_at, 0);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::NoDims { ref tensor, .. } if tensor == "alpha"),
        "{e:?}"
    );
    assert!(e.to_string().contains("zero dimensions"), "{e}");
}

#[test]
fn zero_sized_dim() {
    let mut b = base_bytes();
    let (_, dims_at, ..) = tensor_fields(&b, "alpha");
    put_u64(&mut b, dims_at + 8, 0);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::ZeroDim { index: 1, ref tensor, .. } if tensor == "alpha"),
        "{e:?}"
    );
    assert!(e.to_string().contains("dimension 1 of size 0"), "{e}");
}

#[test]
fn element_count_overflow() {
    let mut b = base_bytes();
    let (_, dims_at, ..) = tensor_fields(&b, "alpha");
    put_u64(&mut b, dims_at, 1 << 40);
    put_u64(&mut b, dims_at + 8, 1 << 40);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::ElementCountOverflow { ref tensor, .. } if tensor == "alpha"),
        "{e:?}"
    );
    assert!(e.to_string().contains("element count overflows"), "{e}");
}

#[test]
fn element_count_above_i64_max() {
    let mut b = base_bytes();
    let (_, dims_at, ..) = tensor_fields(&b, "alpha");
    put_u64(&mut b, dims_at, 1 << 63);
    put_u64(&mut b, dims_at + 8, 1);
    let e = open_err(&b);
    assert!(matches!(e, GgufError::ElementCountOverflow { .. }), "{e:?}");
}

#[test]
fn byte_size_overflow() {
    // Fits in the element count but not once multiplied by 4 bytes.
    let mut b = base_bytes();
    let (_, dims_at, ..) = tensor_fields(&b, "alpha");
    put_u64(&mut b, dims_at, 1 << 62);
    put_u64(&mut b, dims_at + 8, 1);
    let e = open_err(&b);
    assert!(
        matches!(
            e,
            GgufError::ElementCountOverflow { .. } | GgufError::DataOutOfBounds { .. }
        ),
        "{e:?}"
    );
}

#[test]
fn row_not_multiple_of_block() {
    let mut b = base_bytes();
    let (_, dims_at, ..) = tensor_fields(&b, "alphb");
    put_u64(&mut b, dims_at, 48);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::RowNotBlockMultiple { ne0: 48, block_size: 32, ref tensor, .. } if tensor == "alphb"),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("row size 48, not a multiple of the block size 32"),
        "{e}"
    );
}

#[test]
fn unknown_tensor_type() {
    let mut b = base_bytes();
    let (_, _, type_at, _) = tensor_fields(&b, "alphb");
    put_u32(&mut b, type_at, 4); // Q4_2, removed from ggml
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::UnknownTensorType { type_id: 4, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("unknown ggml type id 4"), "{e}");
}

#[test]
fn tensor_data_out_of_bounds() {
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "alphb");
    put_u64(&mut b, off_at, 1 << 20);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::DataOutOfBounds { ref tensor, offset, .. } if tensor == "alphb" && offset == 1 << 20),
        "{e:?}"
    );
    assert!(e.to_string().contains("out of bounds"), "{e}");
}

#[test]
fn tensor_offset_overflow_is_out_of_bounds() {
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "alphb");
    put_u64(&mut b, off_at, u64::MAX - 31);
    let e = open_err(&b);
    assert!(matches!(e, GgufError::DataOutOfBounds { .. }), "{e:?}");
}

#[test]
fn tensor_data_misaligned() {
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "alphb");
    let off = u64::from_le_bytes(b[off_at..off_at + 8].try_into().unwrap());
    put_u64(&mut b, off_at, off + 4);
    let e = open_err(&b);
    assert!(
        matches!(e, GgufError::Misaligned { alignment: 32, ref tensor, .. } if tensor == "alphb"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("not a multiple of the alignment 32"),
        "{e}"
    );
}

#[test]
fn missing_tensor_and_unsupported_type_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = base_bytes();
    // Retype "alpha" (F32, 16 elements = 64 bytes) as I32 (same size): valid
    // file, but not dequantizable.
    let (_, _, type_at, _) = tensor_fields(&b, "alpha");
    put_u32(&mut b, type_at, 26);
    let f = GgufFile::open(write_tmp(dir.path(), "m.gguf", &b)).unwrap();
    let e = f.dequantize("gamma").unwrap_err();
    assert!(matches!(e, GgufError::TensorNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("no tensor named 'gamma'"), "{e}");
    let e = f.dequantize("alpha").unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::UnsupportedType {
                ty: gguf::GgmlType::I32,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("tensor 'alpha': cannot dequantize ggml type I32"),
        "{e}"
    );
}

#[test]
fn trailing_padding_after_last_tensor_is_optional() {
    let b = base_bytes();
    let (_, _, _, off) = tensor_fields(&b, "alphb");
    let data_start = (off + 8).next_multiple_of(32);
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(write_tmp(
        dir.path(),
        "short.gguf",
        &b[..data_start + 64 + 68],
    ))
    .unwrap();
    let t = f.tensor("alphb").unwrap();
    assert_eq!(f.tensor_data(t).len(), 68);
}
