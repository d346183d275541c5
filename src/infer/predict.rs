//! Prediction of whole volumes with a trained model: sliding windows over the volume, the
//! foreground probability of decoder 1 (optionally averaged with decoder 2 and over mirrored
//! windows), threshold 0.5.

use anyhow::Result;

use crate::caml::model::Caml;
use crate::data::{Image, Mask};
use crate::infer::window::{WindowOptions, flip_patches, mirror_combinations, sliding_window, threshold};
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
    /// Test-time mirroring: the axes (X, Y, Z) along which every window is also flipped, run and
    /// flipped back; the probabilities are averaged over every combination of those flips.
    pub mirror: [bool; 3],
    /// Keep only the largest connected component of the mask.
    pub largest_component: bool,
}

impl PredictOptions {
    /// The settings in words, for the lines a command prints and the summaries it writes.
    pub fn describe(&self) -> String {
        let w = &self.window;
        let dims = |d: [usize; 3]| format!("{}x{}x{}", d[0], d[1], d[2]);
        let axes: String =
            ["x", "y", "z"].iter().zip(self.mirror).filter(|(_, on)| *on).map(|(a, _)| *a).collect();
        [
            format!("patch {}", dims(w.patch)),
            format!("stride {}", dims(w.stride)),
            (if w.gaussian { "Gaussian-weighted windows" } else { "uniform windows" }).to_string(),
            (if self.average_decoders { "both decoders averaged" } else { "decoder 1" }).to_string(),
            if axes.is_empty() { "no mirroring".to_string() } else { format!("mirrored along {axes}") },
            (if self.largest_component { "largest component" } else { "every component" }).to_string(),
            (if self.normalize { "images z-normalised" } else { "images as stored" }).to_string(),
        ]
        .join(", ")
    }
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
    let run = |patches: &[f32], n: usize| {
        no_grad(|| {
            let x = Tensor::from_vec(patches, &[n, 1, px, py, pz]);
            let fg = |logits: Tensor| logits.softmax(1).narrow(1, 1, 1);
            let mut p = fg(model.forward_v(&x));
            if opts.average_decoders {
                p = p.add(&fg(model.forward_a(&x))).mul_scalar(0.5);
            }
            p.to_vec()
        })
    };
    let flips = mirror_combinations(opts.mirror);
    sliding_window(image, &opts.window, |patches, n| {
        let mut sum = run(patches, n);
        for &flip in &flips[1..] {
            let p = run(&flip_patches(patches, opts.window.patch, flip), n);
            for (s, v) in sum.iter_mut().zip(flip_patches(&p, opts.window.patch, flip)) {
                *s += v;
            }
        }
        if flips.len() > 1 {
            let scale = 1.0 / flips.len() as f32;
            sum.iter_mut().for_each(|s| *s *= scale);
        }
        Ok(sum)
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
