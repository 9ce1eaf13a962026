"""The field's two standard few-shot backbones as Keras 3 models, for `KerasBackbone`.

Each is a factory `(image_shape, way, ...) -> keras.Model` of standard
layers, the shape `main.py --backbone=MODULE:FUNCTION` takes:

    python main.py --backbone=tf_mamlpp.backbones:resnet12

- `conv4`: the built-in network's architecture (Finn et al. 2017; Antoniou
  et al. 2019): four stages of 3x3 convolution, batch norm, leaky ReLU and
  2x2 max-pooling, then a linear head. Through `KerasBackbone` it computes
  what `MamlppNetwork` does (tests/test_keras_backbone.py).
- `resnet12`: the ResNet-12 of few-shot papers (Oreshkin et al. 2018, Lee
  et al. 2019): four residual blocks of three 3x3 convolutions with batch
  norm and leaky ReLU (slope 0.1), a 1x1 convolution on the shortcut, 2x2
  max-pooling after each block, global average pooling and a linear head.
  The widths are arguments, so that a small one trains on a CPU.
"""

import keras


def conv4(image_shape, way, filters=64, stages=4):
    """The built-in 4-stage conv network as a Keras model (see the module docstring)."""
    layers = [keras.Input(tuple(image_shape))]
    for _ in range(stages):
        layers += [keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
                   keras.layers.BatchNormalization(epsilon=1e-5),
                   keras.layers.LeakyReLU(negative_slope=0.01),
                   keras.layers.MaxPooling2D(2)]
    layers += [keras.layers.Flatten(), keras.layers.Dense(way)]
    return keras.Sequential(layers, name="conv4")


def resnet12(image_shape, way, widths=(64, 160, 320, 640)):
    """ResNet-12 (see the module docstring); `widths` are the four blocks' channels."""
    images = keras.Input(tuple(image_shape))
    x = images
    for width in widths:
        x = _residual_block(x, width)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(way)(x), name="resnet12")


def _residual_block(x, width):
    """Three convolutions beside a projected shortcut, added, activated and pooled."""
    shortcut = keras.layers.BatchNormalization(epsilon=1e-5)(
        keras.layers.Conv2D(width, 1, use_bias=False)(x))
    for index in range(3):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
        if index < 2:
            x = keras.layers.LeakyReLU(negative_slope=0.1)(x)
    x = keras.layers.LeakyReLU(negative_slope=0.1)(keras.layers.Add()([x, shortcut]))
    return keras.layers.MaxPooling2D(2)(x)
