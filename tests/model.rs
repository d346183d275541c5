//! The CAML model: the reference's state_dict names and shapes, the forward shapes, and
//! prediction with test-time mirroring.

use caml_wgpu::Tensor;
use caml_wgpu::caml::model::Caml;

/// (name, shape) of every entry of the reference's state_dict.
fn reference_keys() -> Vec<(String, Vec<usize>)> {
    let text = include_str!("../data/state_dict_keys.txt");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let dims = f[1].trim_matches(|c| c == '(' || c == ')');
            let shape = dims.split(',').filter_map(|d| d.trim().parse().ok()).collect();
            (f[0].to_string(), shape)
        })
        .collect()
}

#[test]
fn state_dict_matches_the_reference_names_and_shapes() {
    // Built at the paper's width; nothing runs, so the parameters are only allocated.
    let model = Caml::new(16, 32, true, 1337);
    let (params, buffers) = model.named();
    let mut ours: Vec<(String, Vec<usize>)> =
        params.iter().chain(&buffers).map(|(k, t)| (k.clone(), t.shape().to_vec())).collect();
    let mut want = reference_keys();
    ours.sort();
    want.sort();
    assert_eq!(want.len(), 470);
    let missing: Vec<_> = want.iter().filter(|w| !ours.iter().any(|o| o.0 == w.0)).collect();
    let extra: Vec<_> = ours.iter().filter(|o| !want.iter().any(|w| w.0 == o.0)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
    assert_eq!(ours, want);
    let trainable: usize = params.iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(trainable, 20_128_836, "the reference's parameter count");
}

#[test]
fn forward_gives_logits_and_embeddings_for_both_networks() {
    let model = Caml::new(2, 8, true, 1);
    let x =
        Tensor::from_vec(&caml_wgpu::rng::Rng::new(2).vec(4 * 16 * 16 * 16, -1.0, 1.0), &[4, 1, 16, 16, 16]);
    let out = model.forward(&x, Some(5));
    assert_eq!(out.out_v.shape(), &[4, 2, 16, 16, 16]);
    assert_eq!(out.out_a.shape(), &[4, 2, 16, 16, 16]);
    assert_eq!(out.emb_v.shape(), &[4, 2, 16, 16, 16]);
    assert_eq!(out.emb_a.shape(), &[4, 2, 16, 16, 16]);
    // Eval mode is deterministic and skips CMA and dropout; training mode differs from it.
    let a = model.forward_a(&x).to_vec();
    assert_eq!(a, model.forward_a(&x).to_vec());
    assert_ne!(a, out.out_a.to_vec());
}

#[test]
fn dropout_probability_zero_draws_no_masks() {
    // Without CMA the only randomness of training mode is dropout: with p = 0 two seeds give
    // the same outputs, with the reference's 0.5 they do not.
    let mut model = Caml::new(2, 8, false, 3);
    let x =
        Tensor::from_vec(&caml_wgpu::rng::Rng::new(4).vec(2 * 16 * 16 * 16, -1.0, 1.0), &[2, 1, 16, 16, 16]);
    let outputs = |m: &Caml, seed| {
        let o = m.forward(&x, Some(seed));
        (o.out_v.to_vec(), o.emb_a.to_vec())
    };
    assert_eq!(model.dropout, 0.5);
    assert_ne!(outputs(&model, 1), outputs(&model, 2));
    model.dropout = 0.0;
    assert_eq!(outputs(&model, 1), outputs(&model, 2));
}

#[test]
fn mirrored_prediction_averages_the_flipped_windows_flipped_back() {
    use caml_wgpu::data::Volume;
    use caml_wgpu::infer::predict::{PredictOptions, probability};
    use caml_wgpu::infer::window::{WindowOptions, flip_patches, mirror_combinations};

    // One window covering the whole image: flipping the window is flipping the image.
    let patch = [16, 16, 16];
    let model = Caml::new(2, 8, true, 7);
    let values = caml_wgpu::rng::Rng::new(9).vec(16 * 16 * 16, -1.0, 1.0);
    let image = Volume::from_vec(patch, values.clone()).unwrap();
    let opts = |mirror| PredictOptions {
        window: WindowOptions { patch, stride: [8, 8, 8], gaussian: false, batch: 1 },
        normalize: false,
        average_decoders: false,
        mirror,
        largest_component: false,
    };
    let plain = probability(&model, &image, &opts([false; 3])).unwrap();
    for axes in [[true, true, false], [false, false, true]] {
        let flips = mirror_combinations(axes);
        let mut want = vec![0f32; values.len()];
        for &f in &flips {
            let flipped = Volume::from_vec(patch, flip_patches(&values, patch, f)).unwrap();
            let p = probability(&model, &flipped, &opts([false; 3])).unwrap();
            for (w, v) in want.iter_mut().zip(flip_patches(p.data(), patch, f)) {
                *w += v / flips.len() as f32;
            }
        }
        let got = probability(&model, &image, &opts(axes)).unwrap();
        let worst = got.data().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{axes:?}: off by {worst}");
        // The untrained network is not symmetric: mirroring changes its answer.
        let moved = got.data().iter().zip(plain.data()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(moved > 1e-3, "{axes:?}: mirroring changed nothing ({moved})");
    }
}
