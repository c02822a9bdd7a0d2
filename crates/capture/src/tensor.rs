//! The tensor every checkpoint is exchanged as, and the one argmax.

/// A row-major f32 tensor in the canonical layout of its stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Panics when the shape does not match the data: a programming error
    /// inside the tool. Data from files goes through [`Tensor::try_new`].
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "tensor shape {shape:?} does not match {} values", data.len());
        Tensor { shape, data }
    }

    /// A tensor from outside data, with the mismatch as an error.
    pub fn try_new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, String> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(format!("shape {shape:?} does not match {} values", data.len()));
        }
        Ok(Tensor { shape, data })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row `i` of the outermost axis.
    pub fn row(&self, i: usize) -> &[f32] {
        let width = self.shape.iter().skip(1).product::<usize>();
        &self.data[i * width..(i + 1) * width]
    }
}

/// Index of the largest value, the first one on ties (as llama.cpp's greedy
/// sampler); NaN never wins. 0 for an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_of_ties_and_never_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
        assert_eq!(argmax(&[0.5, f32::NAN, 1.0]), 2);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn try_new_checks_the_shape() {
        assert!(Tensor::try_new(vec![2, 2], vec![0.0; 3]).is_err());
        assert_eq!(Tensor::try_new(vec![2, 2], vec![0.0; 4]).unwrap().row(1), &[0.0, 0.0]);
    }
}
