"""The built-in synthetic world: every dataset this repo needs, derived from one plain scene dict.

No weights or data can be downloaded at run time, so the default data is made here. Three
submodules, split by who uses them; import the one you need (nothing is re-exported here):

- `world.scenes`: scene sampling, renders, PNG/GIF media, captions, prompts and VQA
  (01 writes the training splits with it; 06 renders the ceiling; 03 and 05 read what 01 wrote);
- `world.claims`: the TED claim language, the nine hard-negative builders, `make_statement(s)`,
  the statement types and the difficulty knobs (01 builds TED-6K with it; 02 uses `bow_tokens`;
  encoders.py trains the world tokenizer on `claims.text_corpus`);
- `world.checker`: reads objects back out of pixels and scores a sample against its scene (06).

claims and checker import scenes; scenes imports neither.

    import random
    from world import scenes, claims, checker
    rng = random.Random(0)
    scene = scenes.sample_scene(rng, "video")
    frames = scenes.render_video(scene)                        # uint8 [8, 32, 32, 3]
    print(scenes.write_captions(scene, rng)[0])
    s = claims.make_statement(scene, "Quantity", rng)         # a true claim and three false ones
    print(claims.render_claim(s["correct"]), [claims.render_claim(c) for c in s["incorrect"]])
    print(checker.check_sample(frames, scene))                 # all 1.0 on the world's own renders
"""
