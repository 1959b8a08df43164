"""The built-in synthetic world: every dataset this repo needs, derived from one plain scene dict.

No weights or data can be downloaded at run time, so the default data is made here, in three modules
(nothing is re-exported here): `world.scenes` (scenes, renders, media, captions, prompts, VQA; 01 writes
the splits with it), `world.claims` (the TED claim language, hard negatives, statement types; 01 builds
TED-6K with it) and `world.checker` (reads objects back from pixels and scores a sample; 06). claims and
checker import scenes; scenes imports neither.

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
