//! Prediction of whole volumes with a trained model: sliding windows over the volume, the
//! foreground probability of decoder 1 (optionally averaged with decoder 2), threshold 0.5.

use anyhow::Result;

use crate::caml::model::Caml;
use crate::data::{Image, Mask};
use crate::infer::window::{WindowOptions, sliding_window, threshold};
use crate::metrics::{Connectivity, largest_connected_component};
use crate::no_grad;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct PredictOptions {
    pub window: WindowOptions,
    /// Z-normalise the image over its whole volume first (the LA preprocessing's step).
    pub normalize: bool,
    /// Average the foreground probabilities of both decoders instead of decoder 1's alone.
    pub average_decoders: bool,
    /// Keep only the largest connected component of the mask.
    pub largest_component: bool,
}

/// The foreground probability of every voxel of `image`.
pub fn probability(model: &Caml, image: &Image, opts: &PredictOptions) -> Result<Image> {
    let [px, py, pz] = opts.window.patch;
    let normalized;
    let image = if opts.normalize {
        normalized = crate::data::dataset::z_normalize(image)?;
        &normalized
    } else {
        image
    };
    sliding_window(image, &opts.window, |patches, n| {
        no_grad(|| {
            let x = Tensor::from_vec(patches, &[n, 1, px, py, pz]);
            let fg = |logits: Tensor| logits.softmax(1).narrow(1, 1, 1);
            let mut p = fg(model.forward_v(&x));
            if opts.average_decoders {
                p = p.add(&fg(model.forward_a(&x))).mul_scalar(0.5);
            }
            Ok(p.to_vec())
        })
    })
}

/// The binary mask of `image`: probability > 0.5, optionally its largest component.
pub fn predict(model: &Caml, image: &Image, opts: &PredictOptions) -> Result<(Mask, Image)> {
    let prob = probability(model, image, opts)?;
    let mut mask = threshold(&prob);
    if opts.largest_component {
        mask = largest_connected_component(&mask, Connectivity::Full26);
    }
    Ok((mask, prob))
}
