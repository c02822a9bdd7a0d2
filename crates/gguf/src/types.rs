//! ggml tensor types, by their ggml id (ggml/include/ggml.h), with the block
//! geometry from ggml's `type_traits` table (ggml/src/ggml.c, ggml-common.h).

use std::fmt;

/// A ggml tensor type. Ids follow `enum ggml_type`; ids ggml does not define
/// (or has removed) are kept as `Other(id)`.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    Q2_0,
    Other(u32),
}

/// (type, ggml id, name, elements per block, bytes per block)
const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 2 + 16),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 2 * 2 + 16),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 2 + 4 + 16),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 2 * 2 + 4 + 16),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 2 + 32),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 2 * 2 + 32),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 2 * 2 + 256 / 16 + 256 / 4),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 2 + 256 / 4 + 256 / 8 + 12),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 2 * 2 + 12 + 256 / 2),
    (
        GgmlType::Q5_K,
        13,
        "Q5_K",
        256,
        2 * 2 + 12 + 256 / 2 + 256 / 8,
    ),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 2 + 256 / 16 + 3 * 256 / 4),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 4 + 256 + 256 / 16 * 2),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 2 + 256 / 8 * 2),
    (
        GgmlType::IQ2_XS,
        17,
        "IQ2_XS",
        256,
        2 + 256 / 8 * 2 + 256 / 32,
    ),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 2 + 3 * (256 / 8)),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 2 + 256 / 8 + 256 / 16),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 2 + 16),
    (
        GgmlType::IQ3_S,
        21,
        "IQ3_S",
        256,
        2 + 13 * (256 / 32) + 256 / 64,
    ),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 2 + 256 / 4 + 256 / 16),
    (
        GgmlType::IQ4_XS,
        23,
        "IQ4_XS",
        256,
        2 + 2 + 256 / 64 + 256 / 2,
    ),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (
        GgmlType::IQ1_M,
        29,
        "IQ1_M",
        256,
        256 / 8 + 256 / 16 + 256 / 32,
    ),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (
        GgmlType::TQ1_0,
        34,
        "TQ1_0",
        256,
        2 + 256 / 64 + (256 - 4 * 256 / 64) / 5,
    ),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 2 + 256 / 4),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 1 + 16),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 64 / 16 + 64 / 2),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 2 + 128 / 8),
    (GgmlType::Q2_0, 42, "Q2_0", 64, 2 + 64 / 4),
];

impl GgmlType {
    fn entry(self) -> Option<&'static (GgmlType, u32, &'static str, usize, usize)> {
        TABLE.iter().find(|e| e.0 == self)
    }

    /// The type with ggml id `id`; `Other(id)` if ggml defines none.
    pub fn from_id(id: u32) -> GgmlType {
        TABLE
            .iter()
            .find(|e| e.1 == id)
            .map(|e| e.0)
            .unwrap_or(GgmlType::Other(id))
    }

    /// The ggml id (the value stored in a GGUF tensor info).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Other(id) => id,
            t => t.entry().map(|e| e.1).unwrap_or(u32::MAX),
        }
    }

    /// Upper-case name as llama.cpp's tools print it: "Q4_K", "F32", ...;
    /// "unknown" for `Other`.
    pub fn name(self) -> &'static str {
        self.entry().map(|e| e.2).unwrap_or("unknown")
    }

    /// Elements per block (1 for plain types); None for unknown types.
    pub fn block_size(self) -> Option<usize> {
        self.entry().map(|e| e.3)
    }

    /// Bytes per block; None for unknown types.
    pub fn type_size(self) -> Option<usize> {
        self.entry().map(|e| e.4)
    }

    /// Bytes of a row of `n` elements; None if the type is unknown, `n` is
    /// not a multiple of the block size, or the size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        let bs = self.block_size()?;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size()?)
    }

    /// Whether [`crate::dequant`] can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q2_K
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Every type ggml defines (not `Other`), in id order.
    pub fn all_known() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|e| e.0)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "unknown ggml type {id}"),
            t => f.write_str(t.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for t in GgmlType::all_known() {
            assert!(seen.insert(t.id()), "duplicate id {}", t.id());
            assert_eq!(GgmlType::from_id(t.id()), t);
        }
        assert_eq!(GgmlType::from_id(4), GgmlType::Other(4));
        assert_eq!(GgmlType::Other(4).id(), 4);
        assert_eq!(GgmlType::Other(4).block_size(), None);
    }

    #[test]
    fn sizes_match_ggml_static_asserts() {
        assert_eq!(GgmlType::Q4_K.type_size(), Some(144));
        assert_eq!(GgmlType::Q6_K.type_size(), Some(210));
        assert_eq!(GgmlType::Q5_0.type_size(), Some(22));
        assert_eq!(GgmlType::Q8_0.type_size(), Some(34));
        assert_eq!(GgmlType::Q2_K.type_size(), Some(84));
        assert_eq!(GgmlType::Q3_K.type_size(), Some(110));
        assert_eq!(GgmlType::Q5_K.type_size(), Some(176));
        assert_eq!(GgmlType::IQ4_XS.type_size(), Some(136));
        assert_eq!(GgmlType::TQ1_0.type_size(), Some(54));
        assert_eq!(GgmlType::Q4_K.row_bytes(896), None);
        assert_eq!(GgmlType::Q4_K.row_bytes(1024), Some(4 * 144));
        assert_eq!(GgmlType::F16.row_bytes(3), Some(6));
    }
}
