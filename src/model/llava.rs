//! LLaVA: CLIP features -> projector -> spliced into the decoder's input embeddings at the `<image>`
//! tokens. Greedy generation with MIA-DPO's attention statistics, and sequence log-probs for DPO pairs.
use std::path::{Path, PathBuf};

use super::clip::VisionTower;
use super::config::LlavaConfig;
use super::llama::{Decoder, KvCache, MassCapture, Segment};
use super::lora::LoraAdapter;
use super::weights::WeightStore;
use super::Prefixes;
use crate::backend::{Backend, KeyGroups, KeySpan, Mass};
use crate::text::tokenizer::PromptIds;
use crate::text::{Template, TextTokenizer};
use crate::vision::preprocess::{AspectMode, ClipProcessor};
use crate::{Error, Result};

pub struct Llava<B: Backend> {
    pub be: B,
    pub dir: PathBuf,
    pub cfg: LlavaConfig,
    pub tokenizer: TextTokenizer,
    pub processor: ClipProcessor,
    pub vision: VisionTower<B>,
    /// the projector: linear_1 (text hidden, vision hidden) + bias, activation, linear_2 (text
    /// hidden, text hidden) + bias
    pub proj1: (B::Mat, Option<B::Buf>),
    pub proj2: (B::Mat, Option<B::Buf>),
    pub decoder: Decoder<B>,
    pub adapter: Option<LoraAdapter>,
}

/// Settings of one greedy generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// decoder layer whose attention gives the image attention (default: num_layers / 2)
    pub attn_layer: Option<usize>,
    /// run with the LoRA adapter (when one is loaded)
    pub use_adapter: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 512,
            attn_layer: None,
            use_adapter: true,
        }
    }
}

/// The result of greedy decoding, with MIA-DPO's statistics (definitions in DESIGN.md).
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// generated ids, EOS included when it was generated
    pub token_ids: Vec<u32>,
    pub text: String,
    /// per key group (per image by default), normalised over groups; empty without groups or when no
    /// generated token was fed back into the model (fewer than two generated tokens)
    pub image_attention: Vec<f64>,
    pub attn_layer: usize,
    pub max_softmax_ppl: f64,
    /// raw per-row masses at `attn_layer` (rows = generated tokens fed back, groups); empty without
    /// groups
    pub attention_rows: Vec<Vec<f64>>,
}

/// One prompt of a batched generation: its ids, its image features (n·image_seq_length, hidden) and
/// the key groups whose attention is recorded (None: no attention recorded).
pub struct GenerateItem<'a, B: Backend> {
    pub prompt: &'a PromptIds,
    pub features: &'a B::Buf,
    pub groups: Option<&'a KeyGroups>,
}

/// Logits and attention statistics of a whole prompt in one forward pass (for parity checks).
pub struct PromptPass {
    /// (t, vocab)
    pub logits: Vec<f32>,
    /// per layer: (t, image spans), heads averaged; empty without images
    pub image_mass: Vec<Vec<f32>>,
}

impl<B: Backend> Llava<B> {
    /// Loads an HF llava-hf checkpoint folder; every tensor is checked against config.json.
    pub fn load(dir: &Path, be: B) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "model folder not found"));
        }
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), &cfg)?;
        let processor = ClipProcessor::from_file(dir.join("preprocessor_config.json"))?;
        let (ch, cw) = processor.output_size();
        if ch != cfg.vision.image_size || cw != cfg.vision.image_size {
            return Err(Error::file(
                dir.join("preprocessor_config.json"),
                format!(
                    "crop size {ch}x{cw} does not match the vision tower's image_size {}",
                    cfg.vision.image_size
                ),
            ));
        }
        let w = WeightStore::open_dir(dir)?;
        let p = Prefixes::detect(&w)?;
        let vision = VisionTower::load(&be, &w, &cfg, &p.vision)?;
        let (vh, th) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let lin = |name: &str, o: usize, i: usize| -> Result<(B::Mat, Option<B::Buf>)> {
            let wt = be.matrix(
                w.get(&format!("{}{name}.weight", p.projector))?
                    .expect_shape(&[o, i])?,
            )?;
            let b = if cfg.projector_bias {
                Some(
                    be.vector(
                        w.get(&format!("{}{name}.bias", p.projector))?
                            .expect_shape(&[o])?,
                    )?,
                )
            } else {
                None
            };
            Ok((wt, b))
        };
        let proj1 = lin("linear_1", th, vh)?;
        let proj2 = lin("linear_2", th, th)?;
        let decoder = Decoder::load(&be, &w, &cfg.text, &p.decoder, &p.lm_head)?;
        Ok(Llava {
            be,
            dir: dir.to_path_buf(),
            cfg,
            tokenizer,
            processor,
            vision,
            proj1,
            proj2,
            decoder,
            adapter: None,
        })
    }

    /// Loads a PEFT LoRA adapter and attaches it (unmerged); it is used where `use_adapter` is set.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let a = LoraAdapter::load(dir, self.cfg.text.num_layers)?;
        self.decoder.detach_lora();
        self.decoder.attach_lora(&self.be, &a)?;
        self.adapter = Some(a);
        Ok(())
    }

    /// The backend's name (e.g. `cpu`).
    pub fn be_name(&self) -> &'static str {
        self.be.name()
    }

    /// Default layer for the image attention: num_layers / 2.
    pub fn default_attn_layer(&self) -> usize {
        self.cfg.text.num_layers / 2
    }

    /// Decodes and preprocesses one image file -> (3, S, S).
    pub fn pixels(&self, path: &Path, aspect: AspectMode) -> Result<Vec<f32>> {
        self.processor.load_and_preprocess(path, aspect)
    }

    /// Tokenized prompt for a question with `n_images` `<image>` placeholders.
    pub fn prompt(&self, template: Template, question: &str, n_images: usize, id: &str) -> Result<PromptIds> {
        self.tokenizer.prompt(template, question, n_images, id)
    }

    /// images, each (3, S, S) -> projected features (n·image_seq_length, text hidden)
    pub fn image_features(&self, pixels: &[Vec<f32>]) -> B::Buf {
        let v = self.vision_features(pixels);
        self.project(&v, pixels.len() * self.vision.tokens_per_image())
    }

    /// The vision tower's selected features of the images: (n·image_seq_length, vision hidden).
    pub fn vision_features(&self, pixels: &[Vec<f32>]) -> B::Buf {
        let images: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        self.vision.forward(&self.be, &images)
    }

    /// The projector: v (rows, vision hidden) -> (rows, text hidden).
    pub fn project(&self, v: &B::Buf, rows: usize) -> B::Buf {
        let be = &self.be;
        let mut h = be.linear(v, rows, &self.proj1.0, self.proj1.1.as_ref());
        be.activation(&mut h, self.cfg.projector_act);
        be.linear(&h, rows, &self.proj2.0, self.proj2.1.as_ref())
    }

    /// The projector's weight gradients from the gradient of its output `dfeat` (rows, text hidden),
    /// recomputing its forward from `v` (rows, vision hidden): (dW1, db1, dW2, db2).
    pub fn projector_backward(&self, v: &B::Buf, rows: usize, dfeat: &B::Buf) -> [B::Buf; 4] {
        let be = &self.be;
        let ((th, vh), (th2, _)) = (be.mat_shape(&self.proj1.0), be.mat_shape(&self.proj2.0));
        let pre = be.linear(v, rows, &self.proj1.0, self.proj1.1.as_ref()); // (rows, th)
        let mut a = pre.clone();
        be.activation(&mut a, self.cfg.projector_act);
        let mut dw2 = be.upload(&vec![0.0; th2 * th]);
        be.matmul_tn_acc(&mut dw2, 1.0, dfeat, &a, rows, th2, th);
        let db2 = be.col_sum(dfeat, rows, th2);
        let da = be.linear_backward(dfeat, rows, &self.proj2.0);
        let dpre = be.activation_backward(&pre, &da, self.cfg.projector_act);
        let mut dw1 = be.upload(&vec![0.0; th * vh]);
        be.matmul_tn_acc(&mut dw1, 1.0, &dpre, v, rows, th, vh);
        let db1 = be.col_sum(&dpre, rows, th);
        [dw1, db1, dw2, db2]
    }

    /// Input embeddings of `ids` (t, hidden) with the image features written over the image tokens.
    fn embed_prompt(&self, ids: &[u32], features: &B::Buf) -> Result<B::Buf> {
        let be = &self.be;
        let h = self.cfg.text.hidden_size;
        let rows: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == self.cfg.image_token_id)
            .map(|(i, _)| i)
            .collect();
        let mut x = be.embed(ids, &self.decoder.embed);
        let n_feat = be.len(features) / h;
        if rows.len() != n_feat {
            return Err(Error::Invalid(format!(
                "the prompt has {} image tokens but the images give {n_feat} features",
                rows.len()
            )));
        }
        be.scatter_rows(&mut x, h, &rows, features);
        Ok(x)
    }

    /// Input embeddings of a prompt with the image features in place (the trainer's backward pass
    /// starts from them).
    pub fn input_embeddings(&self, ids: &[u32], features: &B::Buf) -> Result<B::Buf> {
        self.embed_prompt(ids, features)
    }

    /// Runs the whole prompt: its KV cache and the logits (1, vocab) of the token after it.
    pub fn prefill(&self, ids: &[u32], features: &B::Buf, use_lora: bool) -> Result<(KvCache<B>, B::Buf)> {
        let be = &self.be;
        let (h, t) = (self.cfg.text.hidden_size, ids.len());
        let x = self.embed_prompt(ids, features)?;
        let mut cache = self.decoder.new_cache(be);
        let (hid, _) = self.decoder.forward(be, x, t, &mut cache, use_lora, None);
        let last = be.slice_rows(&hid, h, t - 1, t);
        Ok((cache, self.decoder.logits(be, &last, 1)))
    }

    /// One forward pass over the whole prompt: logits of every row, and the per-layer attention
    /// mass of every row on each image span (heads averaged).
    pub fn prompt_pass(
        &self,
        prompt: &PromptIds,
        features: &B::Buf,
        use_adapter: bool,
    ) -> Result<PromptPass> {
        let be = &self.be;
        let t = prompt.ids.len();
        let x = self.embed_prompt(&prompt.ids, features)?;
        let mut cache = self.decoder.new_cache(be);
        let groups = image_groups(&prompt.image_spans)?;
        let capture = groups.as_ref().map(|groups| MassCapture {
            groups,
            layers: (0..self.cfg.text.num_layers).collect(),
        });
        let (h, image_mass) = self
            .decoder
            .forward(be, x, t, &mut cache, use_adapter, capture.as_ref());
        let logits = be.download(&self.decoder.logits(be, &h, t));
        Ok(PromptPass { logits, image_mass })
    }

    /// Greedy decoding until EOS or `max_new_tokens`. `spans` are the key spans whose attention
    /// share is reported, one group each (the image spans for `generate`; none: no share);
    /// [`Self::generate_batch`] takes any [`KeyGroups`].
    pub fn generate_ids(
        &self,
        prompt: &PromptIds,
        features: &B::Buf,
        spans: &[KeySpan],
        opts: &GenerateOptions,
    ) -> Result<Generation> {
        self.generate_ids_with(prompt, features, spans, opts, &mut |_| {})
    }

    /// [`Self::generate_ids`] calling `on_token(n)` after each of the n generated tokens.
    pub fn generate_ids_with(
        &self,
        prompt: &PromptIds,
        features: &B::Buf,
        spans: &[KeySpan],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize),
    ) -> Result<Generation> {
        let groups = image_groups(spans)?;
        let item = GenerateItem {
            prompt,
            features,
            groups: groups.as_ref(),
        };
        let mut n = 0;
        let mut g = self.generate_batch(&[item], opts, &mut |new| {
            n += new;
            on_token(n)
        })?;
        Ok(g.pop().expect("one generation per item"))
    }

    /// Greedy decoding of several prompts at once: each prompt is prefilled on its own (memory stays
    /// that of one prompt), then the decode steps of all unfinished sequences run as one packed batch
    /// (one weight read per step for the whole batch). On the CPU, results are bit-identical to one
    /// prompt at a time for batches of up to `DOT_ROWS` sequences (on the GPU the flash-decoding
    /// splits and the products' kernels depend on the batch: equal to rounding). `on_step(k)`: k
    /// more tokens were generated.
    pub fn generate_batch(
        &self,
        items: &[GenerateItem<B>],
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Vec<Generation>> {
        let be = &self.be;
        let vocab = self.cfg.text.vocab_size;
        let layer = opts.attn_layer.unwrap_or(self.default_attn_layer());
        if layer >= self.cfg.text.num_layers {
            return Err(Error::Invalid(format!(
                "--attn-layer {layer} is out of range: the decoder has {} layers (0-based)",
                self.cfg.text.num_layers
            )));
        }
        let use_lora = opts.use_adapter && self.decoder.has_lora();
        let captures: Vec<Option<MassCapture>> = items
            .iter()
            .map(|it| {
                it.groups.map(|groups| MassCapture {
                    groups,
                    layers: vec![layer],
                })
            })
            .collect();
        struct State {
            gen: Vec<u32>,
            rows: Vec<Vec<f64>>,
            log_pmax: f64,
            next: (u32, f64), // the greedy pick of the last logits and its log-probability
        }
        let mut states = Vec::with_capacity(items.len());
        let mut caches = Vec::with_capacity(items.len());
        for it in items {
            let (cache, logits) = self.prefill(&it.prompt.ids, it.features, use_lora)?;
            states.push(State {
                gen: Vec::new(),
                rows: Vec::new(),
                log_pmax: 0.0,
                next: be.greedy_rows(&logits, 1, vocab)[0],
            });
            caches.push(cache);
        }
        // `active[j]` is the item whose cache is `caches[j]`
        let mut active: Vec<usize> = (0..items.len()).collect();
        while !active.is_empty() && opts.max_new_tokens > 0 {
            let generated = active.len(); // one token per unfinished sequence this step
            let mut feed = Vec::with_capacity(active.len());
            let mut j = 0;
            while j < active.len() {
                let st = &mut states[active[j]];
                let (tok, lp) = st.next;
                st.gen.push(tok);
                st.log_pmax += lp;
                if tok == self.tokenizer.eos || st.gen.len() == opts.max_new_tokens {
                    active.remove(j);
                    caches.remove(j);
                } else {
                    feed.push(tok);
                    j += 1;
                }
            }
            on_step(generated);
            if active.is_empty() {
                break;
            }
            // feed the tokens back; their query rows at `layer` are rows of the image attention
            let segs: Vec<Segment> = active
                .iter()
                .map(|&i| Segment {
                    rows: 1,
                    capture: captures[i].as_ref(),
                })
                .collect();
            let x = be.embed(&feed, &self.decoder.embed);
            let (hid, masses) = self.decoder.forward_packed(be, x, &segs, &mut caches, use_lora);
            let logits = self.decoder.logits(be, &hid, active.len()); // (active, vocab)
            let picks = be.greedy_rows(&logits, active.len(), vocab);
            // the captured rows after the picks (the step's wait), in one read
            let firsts: Vec<Option<Mass<B>>> = masses.into_iter().map(|m| m.into_iter().next()).collect();
            let captured: Vec<bool> = firsts.iter().map(Option::is_some).collect();
            let mut rows = be.read_masses(firsts.into_iter().flatten().collect()).into_iter();
            for ((&i, captured), pick) in active.iter().zip(captured).zip(picks) {
                if captured {
                    let m = rows.next().expect("a row per captured sequence");
                    states[i].rows.push(m.iter().map(|&v| v as f64).collect());
                }
                states[i].next = pick;
            }
        }
        items
            .iter()
            .zip(states)
            .map(|(it, st)| {
                let image_attention = if st.rows.is_empty() {
                    Vec::new()
                } else {
                    let mut per = vec![0f64; it.groups.map_or(0, |g| g.n_groups())];
                    for r in &st.rows {
                        per.iter_mut()
                            .zip(r)
                            .for_each(|(a, b)| *a += b / st.rows.len() as f64);
                    }
                    let total: f64 = per.iter().sum();
                    per.iter().map(|p| p / total).collect()
                };
                let n = st.gen.len();
                Ok(Generation {
                    prompt_tokens: it.prompt.ids.len(),
                    text: self.tokenizer.decode(&st.gen)?.trim().to_string(),
                    token_ids: st.gen,
                    image_attention,
                    attn_layer: layer,
                    max_softmax_ppl: if n == 0 {
                        f64::NAN
                    } else {
                        (-st.log_pmax / n as f64).exp()
                    },
                    attention_rows: st.rows,
                })
            })
            .collect()
    }

    /// Sum of log-probs (f64) of each response `tokens(response) + [EOS]` after the prompt: the
    /// prompt is run once and its KV cache shared by the responses.
    pub fn sequence_logps(
        &self,
        prompt: &PromptIds,
        features: &B::Buf,
        responses: &[Vec<u32>],
        use_adapter: bool,
    ) -> Result<Vec<f64>> {
        let be = &self.be;
        let vocab = self.cfg.text.vocab_size;
        let use_lora = use_adapter && self.decoder.has_lora();
        let (cache, first_logits) = self.prefill(&prompt.ids, features, use_lora)?;
        let mut out = Vec::with_capacity(responses.len());
        for r in responses {
            if r.is_empty() {
                return Err(Error::Invalid("empty response".into()));
            }
            let mut total = be.token_logprobs(&first_logits, vocab, &r[..1])[0] as f64;
            if r.len() > 1 {
                let mut c = cache.clone();
                let m = r.len() - 1;
                let x = be.embed(&r[..m], &self.decoder.embed);
                let (hid, _) = self.decoder.forward(be, x, m, &mut c, use_lora, None);
                let logits = self.decoder.logits(be, &hid, m); // (m, vocab)
                total += be
                    .token_logprobs(&logits, vocab, &r[1..])
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>();
            }
            out.push(total);
        }
        Ok(out)
    }
}

/// One key group per image span; None for a prompt without images (nothing to record).
fn image_groups(spans: &[KeySpan]) -> Result<Option<KeyGroups>> {
    (!spans.is_empty())
        .then(|| KeyGroups::per_span(spans))
        .transpose()
}

/// argmax (first index on ties, as torch) and log of its softmax probability (one row on the host;
/// `Backend::greedy_rows` picks where the logits are)
pub use crate::backend::greedy;
