"""RTNT: recursive Transformer in Transformer (letters in words in sentences), on `tntkernels.nn`."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from ..nn import Attention, DropPath, Mlp, TNTBlock
from ..nn.block import fused_inner_sublayer
from .tnt import GLOBAL_POOLS, ClassifierHead, check_image, drop_path_rates, feature_info, init_weights

torch.fx.wrap("check_image")  # torch.fx patches the name in the calling module's globals: this one's too


class TokenMerge(nn.Module):
    """Summarize k lower-level tokens into one upper-level token: LN(k·c) → Linear(k·c → d, no bias) → LN(d).

    The same projection TNT uses from words to sentences (Han et al. 2021, Eq. 8).

    Args:
        num_tokens: k lower-level tokens per upper-level token.  dim: their width c.  dim_out: d.
    Shapes:
        forward(x (..., k, c)) → (..., d), x's dtype.
    """

    def __init__(self, num_tokens: int, dim: int, dim_out: int, norm_layer: type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.norm1 = norm_layer(num_tokens * dim, **dd)
        self.proj = nn.Linear(num_tokens * dim, dim_out, bias=False, **dd)
        self.norm2 = norm_layer(dim_out, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.norm1(x.flatten(-2))))  # (..., d)


class LetterLayer(nn.Module):
    """Pre-norm transformer layer over the letters of each word (attention + MLP, drop-path on both).

    Shapes:
        forward(letters (B·N·M, L, c_l)) → (B·N·M, L, c_l); B images, N sentences, M words per
        sentence, L letters per word.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 proj_drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_layer: type[nn.Module] = nn.LayerNorm, device=None, dtype=None, backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop, backend=backend, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_inner_sublayer(x, self.norm1, self.attn, self.norm2, self.mlp, self.drop_path)
        if fused is not None:  # one Triton kernel, as TNT's word level
            return fused
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RTNTBlock(nn.Module):
    """One RTNT block: letters → (letters→words) → [words → (words→sentences) → sentences].

    The word and sentence levels are exactly a `TNTBlock` (words are its inner tokens, sentences its
    outer tokens), so whatever accelerates TNT accelerates RTNT too.

    Args:
        letter_dim, word_dim, sentence_dim: c_l, c_w, d (letter_dim 0 = no letter level).
        letters_per_word L, words_per_sentence M; num_heads_letter / _word / _sentence.
        mlp_ratio: hidden ratio of the letter and sentence MLPs (the word MLP is 4·c_w, TNT's inner rule).
        qkv_bias, proj_drop, attn_drop, drop_path, norm_layer, backend: as `TNTBlock`.
    Shapes:
        forward(letters (B·N·M, L, c_l) or None, words (B·N, M, c_w), sentences (B, N + 1, d)) →
            the same three, updated. The class token (sentence 0) gets no word contribution.
    Source: docs/tnt-family.md §2 (RTNT, github.com/Marawan29/RTNT); Han et al. 2021 (TNT), Eq. 6-10.
    """

    def __init__(self, letter_dim: int, word_dim: int, sentence_dim: int, letters_per_word: int,
                 words_per_sentence: int, num_heads_letter: int = 1, num_heads_word: int = 2,
                 num_heads_sentence: int = 3, mlp_ratio: float = 4., qkv_bias: bool = False, proj_drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., norm_layer: type[nn.Module] = nn.LayerNorm,
                 device=None, dtype=None, backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if letter_dim > 0:
            self.letter = LetterLayer(letter_dim, num_heads_letter, mlp_ratio, qkv_bias, proj_drop, attn_drop,
                                      drop_path, norm_layer, backend=backend, **dd)
            self.letter_to_word = TokenMerge(letters_per_word, letter_dim, word_dim, norm_layer, **dd)
        else:
            self.letter = self.letter_to_word = None
        self.tnt = TNTBlock(word_dim, sentence_dim, words_per_sentence, num_heads_in=num_heads_word,
                            num_heads_out=num_heads_sentence, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                            proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path, norm_layer=norm_layer,
                            backend=backend, **dd)

    def forward(self, letters: torch.Tensor | None, words: torch.Tensor, sentences: torch.Tensor):
        if self.letter is not None:
            letters = self.letter(letters)  # (B·N·M, L, c_l)
            BN, M, _ = words.shape
            words = words + self.letter_to_word(letters.unflatten(0, (BN, M)))  # (B·N, M, c_w)
        words, sentences = self.tnt(words, sentences)
        return letters, words, sentences


class RTNT(ClassifierHead, nn.Module):
    """Recursive TNT: letters inside words inside sentences, one transformer per level.

    The image is cut into sentences of `patch_size` px, each sentence into words of `word_size` px,
    each word into letters of `letter_size` px (all square, all row-major). A letter token is
    Conv2d(in_chans, letter_dim, kernel = stride = letter_size) of its pixels + a learnable letter
    position (shared by all words). Word tokens start as TokenMerge(letters) + word position,
    sentence tokens as TokenMerge(words); a class token is prepended and a sentence position added.
    Each block updates letters, adds their summary to the words, then runs a `TNTBlock` over words
    and sentences. Final LayerNorm on sentences; the head reads the class token.

    `letters=False` is the paper's ablation without the letter level: words are embedded directly
    by Conv2d(in_chans, word_dim, kernel = stride = word_size) + word position (a TNT with a
    patchify word embedding).

    Differences from the reference code (github.com/Marawan29/RTNT), on purpose:
      * its "words" are two consecutive pixel rows of a sentence reshaped to 4×4, not spatial
        squares; here words and letters are true spatial sub-patches;
      * its letter embedding is a 1×1 conv with stride 2 that drops 3/4 of the pixels; here the
        kernel covers the whole letter (kernel = stride = letter_size), so that conv has
        3·in_chans·letter_dim more weights;
      * it creates frozen, unused `outer_tokens` / `inner_tokens` zero parameters; not here;
      * it uses PyTorch's default init and zero positions, no drop-path, and writes the class-token
        slice in place; here init follows timm's TNT (trunc-normal .02 for Linear weights, class
        token and positions), drop-path is supported and sentences are concatenated.
    Drop-path, as in timm's TNT inner level, draws one mask per row of each level's token tensor:
    per word for letters, per sentence for words, per image for sentences.
    Every other parameter matches the reference one for one (per block: letter LN/attn/LN/MLP,
    letters→words LN/Linear/LN, word LN/attn/LN/MLP, words→sentences LN/Linear/LN, sentence
    LN/attn/LN/MLP; model level: letter conv, class token, 3 positions, 2 stem merges, norm, head).

    Args:
        img_size: square image side (default 32).  patch_size: sentence side (8).  word_size: word
            side (4).  letter_size: letter side (2); each must divide the one before.
        in_chans: C (1).  num_classes: K (10; 0 = no head).  global_pool: "token", "avg" or "".
        sentence_dim d, word_dim c_w, letter_dim c_l: widths.  depth: blocks.
        num_heads_sentence / num_heads_word / num_heads_letter: heads per level.
        mlp_ratio: letter and sentence MLP ratio (word MLP 4·c_w).  qkv_bias: False as the reference.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, norm_layer: as `TNT`.
        letters: build the letter level (False = ablation).
        device, dtype: of the parameters.  backend: forwarded to every attention.
    Shapes (N = (img/patch)² sentences, M = (patch/word)² words per sentence, L = (word/letter)²
        letters per word; defaults N = 16, M = 4, L = 4):
        forward(x (B, C, H, W) float) → logits (B, K).
        forward_features(x) → normalized sentence tokens (B, N + 1, d), class token first.
        Internally letters (B·N·M, L, c_l), words (B·N, M, c_w), sentences (B, N + 1, d).
    Raises:
        ValueError: sizes that do not nest; global_pool unknown; input not (B, C, H, W) with the
            configured (C, H, W).
    Source: docs/tnt-family.md §2 (RTNT, github.com/Marawan29/RTNT); Han et al. 2021 (TNT, arXiv 2103.00112).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 8, word_size: int = 4, letter_size: int = 2,
                 in_chans: int = 1, num_classes: int = 10, global_pool: str = "token", sentence_dim: int = 96,
                 word_dim: int = 24, letter_dim: int = 6, depth: int = 12, num_heads_sentence: int = 3,
                 num_heads_word: int = 2, num_heads_letter: int = 1, mlp_ratio: float = 4., qkv_bias: bool = False,
                 drop_rate: float = 0., pos_drop_rate: float = 0., proj_drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0., norm_layer: type[nn.Module] = nn.LayerNorm,
                 letters: bool = True, device=None, dtype=None, backend: str | None = None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"RTNT: global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        sizes = (img_size, patch_size, word_size) + ((letter_size,) if letters else ())
        for outer, inner in zip(sizes, sizes[1:]):
            if inner <= 0 or outer % inner:
                raise ValueError(f"RTNT: sizes must nest (img {img_size} ⊇ sentence {patch_size} ⊇ word {word_size}"
                                 f"{f' ⊇ letter {letter_size}' if letters else ''}, each dividing the previous)")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = sentence_dim
        self.num_prefix_tokens = 1
        self.backend = backend
        self.input_size = (in_chans, img_size, img_size)
        self.has_letters = letters
        self.patch_size, self.word_size, self.letter_size = patch_size, word_size, letter_size
        self.grid = img_size // patch_size  # sentences per side
        self.words_side = patch_size // word_size
        self.letters_side = word_size // letter_size if letters else 1
        self.num_patches = self.grid ** 2  # N
        self.num_words = self.words_side ** 2  # M, words per sentence
        self.num_letters = self.letters_side ** 2 if letters else 0  # L, letters per word
        self.letter_dim = letter_dim if letters else 0
        self.grid_size = (self.grid, self.grid)
        self.grad_checkpointing = False

        if letters:
            self.letter_embed = nn.Conv2d(in_chans, letter_dim, kernel_size=letter_size, stride=letter_size, **dd)
            self.letter_pos = nn.Parameter(torch.zeros(1, self.num_letters, letter_dim, **dd))
            self.letter_to_word = TokenMerge(self.num_letters, letter_dim, word_dim, norm_layer, **dd)
        else:
            self.word_embed = nn.Conv2d(in_chans, word_dim, kernel_size=word_size, stride=word_size, **dd)
        self.word_pos = nn.Parameter(torch.zeros(1, self.num_words, word_dim, **dd))
        self.word_to_sentence = TokenMerge(self.num_words, word_dim, sentence_dim, norm_layer, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, sentence_dim, **dd))
        self.sentence_pos = nn.Parameter(torch.zeros(1, self.num_patches + 1, sentence_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        self.blocks = nn.ModuleList([
            RTNTBlock(self.letter_dim, word_dim, sentence_dim, self.num_letters, self.num_words,
                      num_heads_letter=num_heads_letter, num_heads_word=num_heads_word,
                      num_heads_sentence=num_heads_sentence, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr, norm_layer=norm_layer,
                      backend=backend, **dd)
            for dpr in drop_path_rates(drop_path_rate, depth)])
        self.feature_info = feature_info(depth, sentence_dim, patch_size)
        self.norm = norm_layer(sentence_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(sentence_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        for name in ("cls_token", "sentence_pos", "word_pos", "letter_pos"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=.02)
        self.apply(init_weights)
        self.pretrained_cfg = {"input_size": self.input_size, "num_classes": num_classes,
                               "first_conv": "letter_embed" if letters else "word_embed", "classifier": "head"}

    _SENTENCES = 2  # a block's state is (letters, words, sentences)
    _STEM = r"^(?:letter_embed\.|letter_pos|letter_to_word\.|word_embed\.|word_pos|word_to_sentence\.|cls_token|sentence_pos)"

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "sentence_pos", "word_pos"} | ({"letter_pos"} if self.has_letters else set())

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Image → (letters (B·N·M, L, c_l) or None, words (B·N, M, c_w)), positions added."""
        B = x.shape[0]
        g, w, l = self.grid, self.words_side, self.letters_side
        # kernel == stride, so one conv over the whole image equals a conv per letter (per word
        # when letters=False): no receptive field crosses a letter's border.
        conv = self.letter_embed if self.has_letters else self.word_embed
        t = conv(x)  # (B, c, g·w·l, g·w·l)
        c = t.shape[1]
        t = t.reshape(B, c, g, w, l, g, w, l).permute(0, 2, 5, 3, 6, 4, 7, 1)  # (B, g_r, g_c, w_r, w_c, l_r, l_c, c)
        if not self.has_letters:
            return None, t.reshape(B * g * g, w * w, c) + self.word_pos  # (B·N, M, c_w)
        letters = t.reshape(B * g * g * w * w, l * l, c) + self.letter_pos  # (B·N·M, L, c_l)
        words = self.letter_to_word(letters.reshape(B * g * g, w * w, l * l, c)) + self.word_pos  # (B·N, M, c_w)
        return letters, words

    def _initial_state(self, x: torch.Tensor) -> tuple:
        """Images → (letters (B·N·M, L, c_l) or None, words (B·N, M, c_w), sentences (B, N + 1, d))."""
        x = check_image("RTNT", x, self.input_size)
        B = x.shape[0]
        letters, words = self._embed(x)
        sentences = self.word_to_sentence(words.reshape(B, self.num_patches, words.shape[1], words.shape[2]))  # (B, N, d)
        sentences = torch.cat([self.cls_token.expand(B, -1, -1), sentences], dim=1)  # (B, N+1, d)
        return letters, words, self.pos_drop(sentences + self.sentence_pos)
