//! How the CPU backend holds a weight: matrices stay in their GGUF encoding
//! (a view of the model's memory map) and are dequantized a row at a time
//! where they are used; vectors, and weights a fault changed at load, are
//! f32. A row dequantized on use is bit for bit the row of a whole-tensor
//! dequantization (GGUF blocks never straddle rows), so the oracle's
//! arithmetic is unchanged while its memory is the file's size, not four
//! bytes per parameter (2.5 GB for the 0.5B model), and a decode step reads
//! a sixth of the bytes.

use anyhow::{ensure, Context, Result};
use capture::Tensor;
use gguf::{GgmlType, MappedBytes};
use std::borrow::Cow;

pub enum StoredWeight {
    Float(Tensor),
    Encoded(EncodedMatrix),
}

/// A `[rows, cols]` matrix in a GGUF encoding.
pub struct EncodedMatrix {
    ty: GgmlType,
    bytes: MappedBytes,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl EncodedMatrix {
    /// `bytes` must hold exactly `rows` rows of `cols` values of `ty`.
    pub fn new(ty: GgmlType, bytes: MappedBytes, rows: usize, cols: usize) -> Result<EncodedMatrix> {
        ensure!(ty.can_dequantize(), "type {ty:?} cannot be dequantized");
        let row_bytes = ty.row_bytes(cols).with_context(|| format!("rows of {cols} values are not whole {ty:?} blocks"))?;
        ensure!(
            row_bytes.checked_mul(rows) == Some(bytes.len()),
            "{} bytes for {rows} rows of {row_bytes} bytes",
            bytes.len()
        );
        Ok(EncodedMatrix { ty, bytes, rows, cols, row_bytes })
    }

    /// Dequantize row `r` into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Result<()> {
        ensure!(r < self.rows && out.len() == self.cols, "row {r} of a [{}, {}] matrix into {} values", self.rows, self.cols, out.len());
        let bytes = &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes];
        gguf::dequant::dequantize_into(self.ty, bytes, out)?;
        Ok(())
    }
}

impl StoredWeight {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            StoredWeight::Float(t) => t.shape.clone(),
            StoredWeight::Encoded(m) => vec![m.rows, m.cols],
        }
    }

    /// The whole weight in f32 (a copy only for an encoded matrix).
    pub fn to_f32(&self) -> Result<Cow<'_, Tensor>> {
        match self {
            StoredWeight::Float(t) => Ok(Cow::Borrowed(t)),
            StoredWeight::Encoded(m) => {
                let mut data = vec![0f32; m.rows * m.cols];
                gguf::dequant::dequantize_into(m.ty, &m.bytes, &mut data)?;
                Ok(Cow::Owned(Tensor::new(vec![m.rows, m.cols], data)))
            }
        }
    }

    /// Row `r` of a matrix: borrowed from an f32 weight, or dequantized into `buf`.
    pub fn row<'a>(&'a self, r: usize, buf: &'a mut [f32]) -> Result<&'a [f32]> {
        match self {
            StoredWeight::Float(t) => {
                let cols = *t.shape.last().context("row of a scalar")?;
                t.data.get(r * cols..(r + 1) * cols).with_context(|| format!("row {r} of a weight of shape {:?}", t.shape))
            }
            StoredWeight::Encoded(m) => {
                m.row_into(r, buf)?;
                Ok(buf)
            }
        }
    }

    /// An f32 vector (norm weights, biases): never encoded.
    pub fn vector(&self) -> Result<&[f32]> {
        match self {
            StoredWeight::Float(t) => Ok(&t.data),
            StoredWeight::Encoded(m) => anyhow::bail!("a [{}, {}] matrix used as a vector", m.rows, m.cols),
        }
    }
}
